"""bench/: the CPU-testable paths of the op and training-step benchmarks, the CSV store, the report and gpu_run.sh.

GPU timing (do_bench, CUDA memory statistics) cannot run here; everything around it does, on tiny smoke cases.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import bench_model, bench_ops, common, plot
from kernels.registry import OPS

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ENV = dict(gpu="TestGPU 80GB", torch="2.x", triton="3.x", git_sha="abc1234", timestamp="2026-01-02T03:04:05Z")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU ops time more steadily on one thread (and do not fight other tests for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quick() -> bench_ops.Settings:
    return bench_ops.Settings(device=CPU, warmup_ms=0, rep_ms=0)


def _row(**kw) -> dict[str, str]:
    base = dict(
        op="contrastive_loss",
        case="c1",
        provider="eager",
        mode="fwd",
        metric="ms",
        unit="ms",
        p50=1.0,
        p20=0.9,
        p80=1.1,
        dtype="bf16",
        dims=dict(B=4, D=8),
        correct="pass",
    )
    base.update(kw)
    return common.make_row(ENV, **base)


# ---- common ---------------------------------------------------------------------------------------------------------


def test_csv_store_overwrites_by_unique_key(tmp_path):
    path = tmp_path / "sub" / "bench.csv"
    assert common.write_rows(path, [_row(), _row(mode="bwd"), _row(metric="peak_mb", unit="MiB", p50=12.5)]) == 3
    # same key (op, case, provider, mode, metric, dtype, gpu) -> replaced in place; new dtype -> appended
    n = common.write_rows(path, [_row(p50=2.0, correct="fail: x"), _row(dtype="fp32", p50=3.0)])
    assert n == 4
    with path.open(newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == common.COLUMNS
    rows = common.read_rows(path)
    assert [(r["mode"], r["metric"], r["dtype"]) for r in rows] == [
        ("fwd", "ms", "bf16"),
        ("bwd", "ms", "bf16"),
        ("fwd", "peak_mb", "bf16"),
        ("fwd", "ms", "fp32"),
    ]
    assert rows[0]["p50"] == "2" and rows[0]["correct"] == "fail: x"
    assert json.loads(rows[0]["dims_json"]) == {"B": 4, "D": 8}
    assert rows[0]["gpu"] == "TestGPU 80GB" and rows[0]["git_sha"] == "abc1234"
    # a different GPU is a different key
    assert common.write_rows(path, [dict(_row(), gpu="Other")]) == 5


def test_csv_store_rejects_bad_rows_and_files(tmp_path):
    with pytest.raises(ValueError, match="columns"):
        common.write_rows(tmp_path / "a.csv", [{"op": "x"}])
    bad = tmp_path / "b.csv"
    bad.write_text("op,case\nx,y\n")
    with pytest.raises(ValueError, match="columns"):
        common.read_rows(bad)
    assert common.read_rows(tmp_path / "missing.csv") == []


def test_missing_values_are_empty_cells():
    r = _row(p50=None, p20=float("nan"), p80=math.inf)
    assert (r["p50"], r["p20"], r["p80"]) == ("", "", "")


@pytest.mark.parametrize("n", [1, 2, 7, 10, 101])
def test_quantiles_match_numpy(n):
    xs = np.random.default_rng(n).exponential(size=n).tolist()
    t = common.quantiles(xs)
    assert t.p50 == pytest.approx(np.quantile(xs, 0.5))
    assert t.p20 == pytest.approx(np.quantile(xs, 0.2))
    assert t.p80 == pytest.approx(np.quantile(xs, 0.8))
    with pytest.raises(ValueError):
        common.quantiles([])


def test_cpu_timer_runs_warmup_and_min_runs_and_clears_grads():
    x = torch.ones(3, requires_grad=True)
    calls = []

    def fn():
        assert x.grad is None  # grad_to_none cleared before every call
        (x * 2).sum().backward()
        calls.append(1)

    t = common.time_fn(fn, CPU, warmup=0, rep=0, grad_to_none=[x])
    assert len(calls) >= 1 + 3
    assert 0 < t.p20 <= t.p50 <= t.p80
    assert common.peak_memory_mb(fn, CPU) is None  # no allocator statistics off CUDA
    with pytest.raises(ValueError):
        common.time_steps(fn, 0, CPU)


def test_env_info_and_dtype_parsing(monkeypatch):
    monkeypatch.setenv("GIT_SHA", "feedbeef")
    env = common.env_info(CPU)
    assert env["git_sha"] == "feedbeef" and env["gpu"].startswith("cpu") and env["torch"] == torch.__version__
    assert env["timestamp"].endswith("Z")
    assert common.parse_dtypes("bf16, fp32") == [torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="fp8"):
        common.parse_dtypes("fp8")


def test_is_oom():
    assert common.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert common.is_oom(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
    assert not common.is_oom(RuntimeError("shape mismatch"))


# ---- bench_ops --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,case", [("assign_attention", "g8-n37-c40"), ("contrastive_loss", "b67-d40-k3"), ("attention", "causal-odd")]
)
def test_correctness_check_passes_reference_and_catches_wrong_output(op, case):
    spec, c = OPS[op], OPS[op].case(case)
    ref = bench_ops.reference_for(spec, c, torch.float32, CPU)
    assert isinstance(ref, bench_ops.Reference)

    def run(fn):
        args, kw, leaves = bench_ops._inputs(spec, c, torch.float32, CPU)
        return bench_ops.check(
            spec, bench_ops._forward_backward(fn, args, kw, leaves, like=torch.float32), ref, torch.float32
        )

    assert run(spec.reference).startswith("pass")
    assert run(lambda *a, **kw: spec.reference(*a, **kw) * 1.01).startswith("fail: out")
    # right forward, missing gradient for the last grad input
    detached = lambda *a, **kw: spec.reference(*a[:-1], a[-1].detach(), **kw)  # noqa: E731
    assert run(detached).startswith(f"fail: grad{spec.grad_inputs[-1]}")


def test_correctness_check_bf16_uses_eager_error_as_baseline():
    spec, c = OPS["contrastive_loss"], OPS["contrastive_loss"].case("b67-d40-k3")
    ref = bench_ops.reference_for(spec, c, torch.bfloat16, CPU)
    assert all(b > 0 for b in ref.base_err)  # bf16 inputs: the same-dtype eager run is not exact
    args, kw, leaves = bench_ops._inputs(spec, c, torch.bfloat16, CPU)
    out = bench_ops._forward_backward(spec.reference, args, kw, leaves, like=torch.bfloat16)
    assert bench_ops.check(spec, out, ref, torch.bfloat16) == "pass"
    out[0] = out[0] + 0.1  # far beyond 2 x eager error + 1e-2
    assert bench_ops.check(spec, out, ref, torch.bfloat16).startswith("fail: out")


def test_bench_provider_rows_and_throughput_from_registry_model():
    spec = OPS["assign_attention"]
    case = spec.case("odd-7x13x24")
    ref = bench_ops.reference_for(spec, case, torch.float32, CPU)
    rows = bench_ops.bench_provider(spec, case, torch.float32, "eager", spec.reference, ref, _quick(), ENV)
    by = {(r["mode"], r["metric"]): r for r in rows}
    assert set(by) == {(m, k) for m in bench_ops.MODES for k in ("ms", "gbps", "pct_floor")}
    assert all(r["correct"] == "pass" and r["dtype"] == "fp32" and r["case"] == "odd-7x13x24" for r in rows)
    for mode in bench_ops.MODES:
        ms = by[(mode, "ms")]
        p20, p50, p80 = (float(ms[k]) for k in ("p20", "p50", "p80"))
        assert 0 < p20 <= p50 <= p80
        gbps = spec.bytes(case.dims, mode, 4) / 1e9 / (p50 * 1e-3)  # the registry's byte model, fp32
        assert float(by[(mode, "gbps")]["p50"]) == pytest.approx(gbps, rel=1e-4)
        assert float(by[(mode, "pct_floor")]["p50"]) == pytest.approx(100 * gbps / 3000, rel=1e-4)
        assert by[(mode, "pct_floor")]["unit"] == "% of 3000 GB/s"


def test_contrastive_reports_tflops_against_790():
    spec = OPS["contrastive_loss"]
    case = spec.case("b5-d16")
    st = dataclasses.replace(_quick(), modes=("fwd",))
    rows = bench_ops.bench_provider(spec, case, torch.float32, "eager", spec.reference, None, st, ENV)
    by = {r["metric"]: r for r in rows}
    tflops = spec.flops(case.dims, "fwd") / 1e12 / (float(by["ms"]["p50"]) * 1e-3)
    assert float(by["tflops"]["p50"]) == pytest.approx(tflops, rel=1e-4)
    assert by["pct_floor"]["unit"] == "% of 790 TFLOP/s"
    assert by["ms"]["correct"] == "unchecked"  # no reference given


def test_failing_providers_give_rows_not_crashes():
    spec = OPS["contrastive_loss"]
    case = spec.case("b5-d16")

    def boom(*a, **kw):
        raise RuntimeError("kernel launch failed")

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    for fn, word in (
        (boom, "error: RuntimeError: kernel launch failed"),
        (oom, "oom"),
        ("unavailable: no module", "unavailable: no module"),
    ):
        rows = bench_ops.bench_provider(spec, case, torch.float32, "triton", fn, None, _quick(), ENV)
        assert [r["mode"] for r in rows] == list(bench_ops.MODES)
        assert all(r["correct"] == word and r["p50"] == "" and r["metric"] == "ms" for r in rows)


def test_triton_provider_unavailable_when_module_missing_or_no_interpreter(monkeypatch):
    spec = dataclasses.replace(OPS["contrastive_loss"], triton="kernels.not_written_yet:contrastive_loss")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    msg = bench_ops.load_provider(spec, "triton", CPU)
    assert isinstance(msg, str) and msg.startswith("unavailable: ModuleNotFoundError")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in bench_ops.load_provider(OPS["contrastive_loss"], "triton", CPU)
    assert bench_ops.load_provider(OPS["attention"], "xformers", CPU).startswith("unavailable")
    with pytest.raises(ValueError, match="unknown provider"):
        bench_ops.load_provider(spec, "cutlass", CPU)


def test_inf_cl_provider_says_why_it_cannot_run(monkeypatch):
    """Inf-CL is optional: a clear row without the package, and it needs CUDA (inline PTX) when installed."""
    import builtins

    real_import = builtins.__import__

    def no_inf_cl(name, *args, **kwargs):
        if name == "inf_cl":
            raise ImportError("No module named 'inf_cl'")
        return real_import(name, *args, **kwargs)

    spec = OPS["contrastive_loss"]
    monkeypatch.setattr(builtins, "__import__", no_inf_cl)
    assert "inf-cl not installed" in bench_ops.load_provider(spec, "inf_cl", CPU)
    monkeypatch.undo()
    img, txt, theta = (torch.randn(4, 256), torch.randn(12, 256), torch.tensor(1.0))
    with pytest.raises(ValueError, match="one positive per row"):
        bench_ops._inf_cl(img, txt, theta, num_prompts=3)
    with pytest.raises(ValueError, match="D = 40"):
        bench_ops._inf_cl(img[:, :40], txt[:4, :40], theta)
    pytest.importorskip("inf_cl")
    assert "needs CUDA" in bench_ops.load_provider(spec, "inf_cl", CPU)


@pytest.mark.gpu
def test_inf_cl_provider_matches_reference():
    pytest.importorskip("inf_cl")
    spec = OPS["contrastive_loss"]
    (img, txt, theta), kw = spec.make_inputs(spec.case("gpu256"), torch.float32, torch.device("cuda"), 0)
    xs = [t.clone().requires_grad_(True) for t in (img, txt, theta)]
    ref = [t.double().clone().requires_grad_(True) for t in (img, txt, theta)]
    loss, ref_loss = bench_ops._inf_cl(*xs, **kw), spec.reference(*ref, **kw)
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * max(1.0, abs(ref_loss.item()))
    for x, r in zip(xs, ref):  # TF32 backward
        assert (x.grad.double() - r.grad).abs().max().item() < 1e-2 * r.grad.abs().max().item() + 1e-6


def test_run_writes_csv_reruns_overwrite_and_max_batch_is_capped(tmp_path, monkeypatch):
    specs = dict(OPS)
    specs["contrastive_loss"] = dataclasses.replace(OPS["contrastive_loss"], triton="kernels.nope:fn")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kw = dict(
        out=tmp_path,
        ops=["contrastive_loss"],
        tags=["smoke"],
        dtypes=[torch.float32],
        providers=["eager", "triton"],
        cases=["b5-d16"],
        st=_quick(),
        max_batch_start=5,
        max_batch_cap=12,
        specs=specs,
    )
    path = bench_ops.run(**kw)
    rows = common.read_rows(path)
    eager = [r for r in rows if r["provider"] == "eager" and r["case"] == "b5-d16"]
    assert {r["metric"] for r in eager} == {"ms", "tflops", "pct_floor"}  # peak_mb only on CUDA
    assert all(r["correct"] == "pass" for r in eager)
    triton = [r for r in rows if r["provider"] == "triton"]
    assert triton and all(r["correct"].startswith("unavailable") for r in triton)
    mb = [r for r in rows if r["metric"] == "max_batch"]
    assert {r["provider"]: (r["p50"], r["case"]) for r in mb} == {
        "eager": ("10", "max-batch-d16"),
        "triton": ("", "max-batch-d16"),
    }
    assert "stop: cap 12" in next(r["correct"] for r in mb if r["provider"] == "eager")
    n = len(rows)
    bench_ops.run(**kw)
    assert len(common.read_rows(path)) == n
    with pytest.raises(ValueError, match="unknown op"):
        bench_ops.run(**{**kw, "ops": ["matmul"]})


def test_bench_ops_cli_smoke(tmp_path, capsys):
    assert (
        bench_ops.main(
            [
                "--out",
                str(tmp_path),
                "--ops",
                "attention",
                "--tags",
                "smoke",
                "--cases",
                "cross-odd",
                "--dtypes",
                "fp32",
                "--providers",
                "eager,sdpa",
                "--modes",
                "fwd",
                "--quick",
            ]
        )
        == 0
    )
    rows = common.read_rows(tmp_path / "bench.csv")
    assert {(r["provider"], r["metric"]) for r in rows} == {
        (p, m) for p in ("eager", "sdpa") for m in ("ms", "tflops", "pct_floor")
    }
    assert all(r["correct"] == "pass" for r in rows)
    assert "cross-odd" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_ops.main(["--out", str(tmp_path), "--modes", "sideways"])


# ---- bench_model --------------------------------------------------------------------------------------------------


def _fake_step(loss_by_backend: dict[str, float]):
    """A stand-in step that trains nothing and reports a loss per backend (to test the bookkeeping)."""
    from groupvit import ops

    def step(model, loss_fn, opt, batch, **kw):
        assert batch["texts"].dtype == torch.long and batch["images"].shape[1] == 3
        return {"loss": loss_by_backend[ops.get_backend()]}

    return step


def test_make_batch_frames_captions_with_sot_and_eot():
    from groupvit.config import get_config

    cfg = get_config("groupvit-tiny")
    b = bench_model.make_batch(cfg, 5, CPU)
    assert b["images"].shape == (5, 3, cfg.vision.img_size, cfg.vision.img_size)
    t = b["texts"]
    assert t.shape == (5, 1 + cfg.multi_label, cfg.text.context_length) and t.dtype == torch.long
    assert bool((t[..., 0] == bench_model.SOT).all())
    assert bool(((t == bench_model.EOT).sum(-1) == 1).all())  # exactly one EOT per sequence ...
    eot = (t == bench_model.EOT).int().argmax(-1)
    after = torch.arange(t.shape[-1]) > eot[..., None]
    assert bool((t[after] == 0).all()) and bool((t[~after] > 0).all())  # ... zeros after it, ids before


def test_bench_model_real_train_step_tiny(tmp_path):
    pytest.importorskip("train.loop")
    path = bench_model.run(
        out=tmp_path,
        preset="groupvit-tiny",
        batch=2,
        configs=["eager"],
        device=CPU,
        steps=2,
        warmup=1,
        autocast="none",
        max_batch=True,
        max_batch_cap=4,
        max_batch_budget_s=60,
    )
    rows = {(r["case"], r["metric"]): r for r in common.read_rows(path)}
    ips = rows[("groupvit-tiny-b2", "images_per_s")]
    ms = rows[("groupvit-tiny-b2", "ms")]
    assert ips["correct"].startswith("pass") and ips["provider"] == "eager" and ips["mode"] == "step"
    assert float(ips["p50"]) == pytest.approx(2 / (float(ms["p50"]) * 1e-3), rel=1e-4)
    assert rows[("groupvit-tiny-max-batch", "max_batch")]["p50"] == "4"


def test_bench_model_loss_check_and_unavailable_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_model, "triton_unavailable", lambda device: None)  # the fake step needs no kernels
    kw = dict(
        out=tmp_path,
        preset="groupvit-tiny",
        batch=2,
        device=CPU,
        steps=1,
        warmup=1,
        autocast="none",
        max_batch=False,
        max_batch_cap=2,
        max_batch_budget_s=1,
    )
    bench_model.run(configs=["triton", "eager"], step_fn=_fake_step({"eager": 2.0, "triton": 2.5}), **kw)
    rows = {(r["provider"], r["metric"]): r for r in common.read_rows(tmp_path / "bench.csv")}
    assert rows[("eager", "ms")]["correct"].startswith("pass")
    assert rows[("triton", "ms")]["correct"] == "warn (loss 25.0% from eager)"  # eager ran first despite the order
    bench_model.run(configs=["eager"], step_fn=_fake_step({"eager": float("nan")}), **kw)
    assert common.read_rows(tmp_path / "bench.csv")[0]["correct"].startswith("fail: first loss nan")

    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench_model.run(configs=["triton"], step_fn=_fake_step({}), **{**kw, "out": tmp_path / "b"})
    (r,) = common.read_rows(tmp_path / "b" / "bench.csv")
    assert r["correct"].startswith("unavailable") and r["p50"] == ""
    bench_model.run(
        configs=["eager"], step_fn="unavailable: no train.loop", **{**kw, "out": tmp_path / "c", "max_batch": True}
    )
    thr, mb = common.read_rows(tmp_path / "c" / "bench.csv")
    assert thr["correct"] == "unavailable: no train.loop" and thr["metric"] == "images_per_s"
    assert mb["metric"] == "max_batch" and mb["p50"] == ""
    assert mb["correct"] == "unchecked; stop: B=2 did not run (unavailable: no train.loop)"
    with pytest.raises(ValueError, match="unknown config"):
        bench_model.run(configs=["jax"], **kw)


# ---- plot ---------------------------------------------------------------------------------------------------------


def _report_rows() -> list[dict[str, str]]:
    """Hand-written rows covering every cell kind of the report."""
    a = dict(op="assign_attention", case="stage1", dims=dict(B=256, G=64, N=196, C=384), mode="fwd_bwd")
    rows = [
        _row(**a, provider="eager", p50=0.5, p20=0.45, p80=0.55),
        _row(**a, provider="eager", metric="pct_floor", unit="% of 3000 GB/s", p50=20.0, p20=None, p80=None),
        _row(**a, provider="triton", p50=0.125, p20=0.12, p80=0.13, correct="fail: out 3/10"),
        _row(
            **a,
            provider="triton",
            metric="pct_floor",
            unit="% of 3000 GB/s",
            p50=80.0,
            p20=None,
            p80=None,
            correct="fail: out 3/10",
        ),
        _row(**a, provider="compile", p50=None, p20=None, p80=None, correct="unavailable: no compiler"),
        _row(**a, provider="eager", metric="peak_mb", unit="MiB", p50=1234.0, p20=None, p80=None),
        _row(
            op="contrastive_loss",
            case="max-batch-k1",
            provider="triton",
            mode="fwd_bwd",
            metric="max_batch",
            unit="rows",
            p50=1048576,
            p20=None,
            p80=None,
            correct="unchecked; stop: oom at B=2097152",
        ),
        _row(
            op="train_step",
            case="groupvit-s-b256",
            provider="triton+compile",
            mode="step",
            metric="images_per_s",
            unit="images/s",
            p50=2500.0,
            p20=2400.0,
            p80=2600.0,
            dims=dict(B=256),
            correct="pass (loss 0.1% from eager)",
        ),
    ]
    return rows


def test_markdown_report_has_provenance_and_marks_bad_cells():
    md = plot.render_markdown(_report_rows())
    assert "2026-01-02T03:04:05Z" in md and "TestGPU 80GB" in md and "abc1234" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| stage1 | fwd_bwd |"))
    header = next(ln for ln in md.splitlines() if ln.startswith("| case | mode |"))
    assert header == "| case | mode | eager | compile | triton |"
    assert line == "| stage1 | fwd_bwd | 0.5 (20%) | n/a | 0.125 (80%) ✗ |"
    assert "| stage1 | 1,234 |" in md  # peak-memory table
    assert "| contrastive_loss | max-batch-k1 | bf16 | triton | 1,048,576 |  | oom at B=2097152 |" in md
    assert "| triton+compile | bf16 | 256 | 2,500 (2,400–2,600) |" in md
    assert plot.render_markdown([]).endswith("No benchmark rows.\n")


def test_readme_section_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{plot.START}\nold table\n{plot.END}\n\n## After\n")
    plot.update_readme(readme, "NEW TABLE\n")
    plot.update_readme(readme, "NEWER TABLE\n")  # idempotent structure: markers survive
    assert readme.read_text() == f"# Title\n\nintro\n\n{plot.START}\nNEWER TABLE\n{plot.END}\n\n## After\n"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        plot.update_readme(readme, "x")


def test_plot_cli_writes_report_pngs_and_readme(tmp_path):
    csv_path = tmp_path / "bench.csv"
    common.write_rows(csv_path, _report_rows())
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{plot.START}\n{plot.END}\nb\n")
    assert plot.main([str(csv_path), "--out", str(tmp_path / "o"), "--readme", str(readme)]) == 0
    assert "| stage1 | fwd_bwd |" in (tmp_path / "o" / "results.md").read_text()
    text = readme.read_text()
    assert text.startswith(f"a\n{plot.START}\n### Benchmarks") and text.endswith(f"{plot.END}\nb\n")
    pngs = sorted((tmp_path / "o").glob("*.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert pngs == []  # skipped with a message
        return
    assert {p.name for p in pngs} >= {"ops_assign_attention_bf16.png", "train_step.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# ---- gpu_run.sh ---------------------------------------------------------------------------------------------------


def test_gpu_run_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_run.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_run_dry_run_on_cpu(tmp_path):
    """Every stage of the GPU run with tiny CPU settings, in the GPU run's order: installs (pip --dry-run), the
    verdict (--dry-run), the gpu-marked tests (collect only), the training step, both op sweeps, the max-batch
    search (time is left) and the report, plus the export of the result files."""
    out, export = tmp_path / "out", tmp_path / "export"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_RUN_EXPORT": str(export),
        "GIT_SHA": "drysha",
        "GPU_TESTS": "tests/test_contrastive_loss.py",
        "GPU_RUN_PLOTS": "0",
    }  # PNGs are covered in-process above
    r = subprocess.run(
        ["bash", "bench/gpu_run.sh", str(out), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    stages = ("install", "verdict", "tests", "model", "ops_bf16", "ops_fp32", "max_batch", "plot")
    for stage in stages:
        assert f"{stage} rc=0 " in summary, summary + r.stdout[-3000:]
    assert [ln.split()[0] for ln in summary.splitlines()[:-1]] == list(stages)  # the order of value
    assert "stages ok 8, failed 0" in summary
    assert any(r["metric"] == "max_batch" for r in common.read_rows(out / "bench.csv"))
    assert "**PASS**" in (out / "verdict" / "verdict.md").read_text()
    assert "test_gpu_parity_large" in (out / "logs" / "tests.log").read_text()  # -m gpu selected the GPU tests
    rows = common.read_rows(out / "bench.csv")
    assert {r["op"] for r in rows} == {"assign_attention", "contrastive_loss", "attention", "train_step"}
    assert {r["dtype"] for r in rows} >= {"bf16", "fp32"} and {r["git_sha"] for r in rows} == {"drysha"}
    assert any(r["provider"] == "triton" and r["correct"].startswith("unavailable") for r in rows)
    assert "Would install" in (out / "logs" / "install.log").read_text()
    assert "drysha" in (out / "results.md").read_text()
    assert sorted(p.name for p in export.iterdir()) == [
        "bench.csv",
        "bundle.tar.gz",
        "results.md",
        "summary.txt",
        "verdict.csv",
        "verdict.md",
    ]


def test_gpu_run_without_python_or_time_exits_nonzero(tmp_path):
    """No usable Python: a message that says how to run it, exit 2. Every stage failing or skipped (here: no time
    left for any): exit 2, never 0."""
    env = {**os.environ, "PYTHON": str(tmp_path / "no-python")}
    r = subprocess.run(
        ["bash", "bench/gpu_run.sh", str(tmp_path / "a"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "no Python with torch" in r.stderr and "PYTHON=" in r.stderr
    env = {**os.environ, "PYTHON": sys.executable, "T_TOTAL": "5"}
    r = subprocess.run(
        ["bash", "bench/gpu_run.sh", str(tmp_path / "b"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = (tmp_path / "b" / "summary.txt").read_text()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "verdict skipped (total budget" in summary and "stages ok 0" in summary
