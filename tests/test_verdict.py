"""bench/verdict.py: the headline items come from the registry, the CPU dry run passes end to end, and a wrong
kernel output or gradient turns the verdict into FAIL (exit status 1)."""

from __future__ import annotations

import csv

import pytest
import torch

from bench import bench_ops, common, verdict
from kernels import reference


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rows(out) -> list[dict[str, str]]:
    with (out / verdict.CSV_NAME).open(newline="") as f:
        return list(csv.DictReader(f))


def test_headline_items_are_the_registry_headline_shapes():
    got = [(it.spec.name, it.case.name, it.mode, it.case.dims, it.kwargs) for it in verdict.headline_items(False)]
    a1, a2 = dict(B=256, G=64, N=196, C=384), dict(B=256, G=8, N=64, C=384)
    assert got == [
        ("assign_attention", "stage1", "eval", a1, {}),
        ("assign_attention", "stage1", "train", a1, {"gumbel": True}),
        ("assign_attention", "stage2", "eval", a2, {}),
        ("assign_attention", "stage2", "train", a2, {"gumbel": True}),
        ("contrastive_loss", "b32768-k1", "train", dict(B=32768, D=256, K=1), {"num_prompts": 1}),
        ("contrastive_loss", "b32768-k3", "train", dict(B=32768, D=256, K=3), {"num_prompts": 3}),
    ]


def test_dry_run_passes_and_writes_csv_and_markdown(tmp_path):
    out = tmp_path / "v"
    assert verdict.main(["--dry-run", "--out", str(out), "--providers", "triton,eager,compile"]) == 0
    md = (out / verdict.MD_NAME).read_text()
    assert "DRY RUN" in md and "**PASS**: 3/3 parity checks pass" in md
    rows = _rows(out)
    by = {(r["op"], r["case"], r["provider"], r["mode"], r["metric"]): r for r in rows}
    assert float(by[("device", "copy-4MiB", "torch", "copy", "gbps")]["p50"]) > 0
    assert float(by[("device", "gemm-bf16-256", "torch", "matmul", "tflops")]["p50"]) > 0
    for name in ("out", "dq", "dk", "dv"):
        for mode in ("eval", "train"):
            r = by[("assign_attention", "odd-7x13x24", "triton", mode, f"parity_{name}")]
            assert r["correct"] == "pass" and 0 <= float(r["p50"]) <= 1
    for name in ("loss", "d_image", "d_text", "d_theta"):
        assert by[("contrastive_loss", "b5-d16", "triton", "train", f"parity_{name}")]["correct"] == "pass"
    for prov in ("triton", "eager"):
        ms = by[("assign_attention", "odd-7x13x24", prov, "train-fwd_bwd", "ms")]
        assert ms["correct"] == "ok" and 0 < float(ms["p20"]) <= float(ms["p50"]) <= float(ms["p80"])
        assert by[("contrastive_loss", "b5-d16", prov, "train-fwd", "pct_ceiling")]["unit"].endswith("TFLOP/s GEMM")
    assert by[("contrastive_loss", "b5-d16", "triton", "train-fwd", "speedup_vs_eager")]["unit"] == "x"
    assert by[("assign_attention", "odd-7x13x24", "compile", "eval-fwd", "ms")]["correct"].startswith("skipped")
    assert not any(r["mode"] == "eval-fwd_bwd" for r in rows)  # eval is timed forward only
    assert {r["dtype"] for r in rows} == {"bf16"}

    # the op sweeps take their "% of floor" from these measured ceilings
    ceil = verdict.read_ceilings(out / verdict.CSV_NAME)
    assert ceil.gemm_tflops == float(by[("device", "gemm-bf16-256", "torch", "matmul", "tflops")]["p50"])
    assert (
        bench_ops.main(
            [
                "--out",
                str(tmp_path / "ops"),
                "--ops",
                "contrastive_loss",
                "--tags",
                "smoke",
                "--cases",
                "b5-d16",
                "--dtypes",
                "fp32",
                "--providers",
                "eager",
                "--modes",
                "fwd",
                "--quick",
                "--no-max-batch",
                "--ceilings",
                str(out / verdict.CSV_NAME),
            ]
        )
        == 0
    )
    pct = next(r for r in common.read_rows(tmp_path / "ops" / "bench.csv") if r["metric"] == "pct_floor")
    assert pct["unit"] == f"% of {ceil.gemm_tflops:g} TFLOP/s"
    with pytest.raises(ValueError, match="no measured ceilings"):
        verdict.read_ceilings(tmp_path / "ops" / "bench.csv")


@pytest.mark.parametrize("op", ["assign_attention", "contrastive_loss"])
def test_wrong_kernel_fails_the_verdict(tmp_path, monkeypatch, op):
    if op == "assign_attention":
        from kernels import assign_attention as mod

        def wrong(q, k, v, **kw):  # right output, no gradient reaches k
            return reference.assign_attention(
                q, k.detach() + 0 * k, v, **{x: y for x, y in kw.items() if x != "gumbel"}
            )

        bad = "dk"
    else:
        from kernels import contrastive_loss as mod

        def wrong(img, txt, theta, **kw):  # loss off by 5%
            return reference.contrastive_loss(img, txt, theta, **kw) * 1.05

        bad = "loss"
    monkeypatch.setattr(mod, op, wrong)
    out = tmp_path / "v"
    assert verdict.main(["--dry-run", "--out", str(out), "--providers", ""]) == 1
    md = (out / verdict.MD_NAME).read_text()
    assert "**FAIL**: " in md and f"{bad}: " in md
    failed = {r["metric"] for r in _rows(out) if r["op"] == op and r["correct"] == "fail"}
    assert f"parity_{bad}" in failed


def test_budget_cut_is_a_failed_verdict_and_cli_errors(tmp_path, capsys):
    out = tmp_path / "v"
    assert verdict.main(["--dry-run", "--out", str(out), "--budget-s", "0", "--providers", ""]) == 1
    assert "0/3 parity checks pass (3 not run)" in (out / verdict.MD_NAME).read_text()
    with pytest.raises(SystemExit):
        verdict.main(["--dry-run", "--providers", "cutlass"])
    assert "unknown provider" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            verdict.main(["--out", str(out)])
        assert "--dry-run" in capsys.readouterr().err
