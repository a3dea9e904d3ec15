"""The compiled-code gate (issue 13 item 1): kernels/variants.py and ``python -m bench.kernel_report``.

``test_gate_ci_subset`` compiles the configs of ``bench.kernel_report.CI_SUBSET`` for sm_90a (and ``CI_SUBSET_SM80``
for sm_80) in a fresh process (``TRITON_INTERPRET=0``, an empty Triton cache: nothing is reused between runs) and
fails when one of them spills, exceeds shared memory or lowers a bf16/fp16/tf32 dot to FMA. It covers: contrastive
forward (bf16, first and last autotune config; fp32 at tf32; the rows-fallback launch ``fwd_fix``), both contrastive
backward kernels at K = 3 (bf16), assign forward and backward in training mode (bf16, stage 1; the fp32 stage-1
backward); on sm_80 the contrastive forward (bf16, fp32 at tf32), the assign stage-1 forward (bf16, fp32 at tf32),
stage-1 backward (bf16) and stage-2 backward (bf16, fp32). The full report (every config, both targets, every dtype)
is ``python -m bench.kernel_report``; its committed output is bench/results/kernel_report.md.
The other tests check the readers on hand-made inputs, so that the gate itself can fail.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import variants as kv

ROOT = Path(__file__).resolve().parents[1]


def test_gate_ci_subset(tmp_path):
    from bench.kernel_report import CI_SUBSET, CI_SUBSET_SM80

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernel_report", "--subset", "ci", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = list(csv.DictReader(open(out.with_suffix(".csv")))) if out.with_suffix(".csv").exists() else []
    bad = [f"{r['op']}/{r['kernel']} {r['dtype']} {r['config']}: {r['gate']}" for r in rows if r["gate"] != "ok"]
    assert proc.returncode == 0 and not bad, "\n".join(bad) or proc.stderr[-3000:]
    assert [r["target"] for r in rows] == ["sm_90a"] * len(CI_SUBSET) + ["sm_80"] * len(CI_SUBSET_SM80)
    for r in rows:
        assert int(r["regs"]) > 0 and int(r["sass"]) > 0, r
        if r["target"] == "sm_90a":
            assert int(r["ptx_wgmma"]) > 0, f"{r['op']}/{r['kernel']}: no wgmma on sm_90a ({r['dots']})"
        else:  # A100: no wgmma; the dots must be on mma.sync
            assert int(r["ptx_wgmma"]) == 0 < int(r["ptx_mma_sync"]), f"{r['op']}/{r['kernel']}: {r['dots']}"
        assert int(r["shared"]) <= int(r["smem_limit"]) == {"sm_90a": 227, "sm_80": 163}[r["target"]] * 1024
    assert "## Gate failures (0 distinct configs)" in out.with_suffix(".md").read_text()


def _row(**kw):
    row = dict(
        spill_stores=0,
        spill_loads=0,
        shared=1000,
        smem_limit=227 * 1024,
        smem_ok=True,
        fma_tc_dots=0,
        dots="wgmma:bf16",
    )
    row.update(kw)
    return row


def test_gate_rules():
    assert kv.gate_failures(_row()) == []
    assert "spills 8 B" in kv.gate_failures(_row(spill_stores=8, spill_loads=8))[0]
    assert "shared memory 300000 B" in kv.gate_failures(_row(shared=300000, smem_ok=False))[0]
    assert "lowered to FMA" in kv.gate_failures(_row(fma_tc_dots=1, dots="fma:bf16"))[0]
    assert len(kv.gate_failures(_row(spill_stores=4, smem_ok=False, fma_tc_dots=2))) == 3


TTGIR = """#blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [4, 1]}>
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
module {
    %1 = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x64xf32, #s> \
* !ttg.memdesc<64x64xf32, #s> -> tensor<128x64xf32, #mma1>
    %2 = tt.dot %x, %y, %z : tensor<64x32xbf16, #d0> * tensor<32x64xbf16, #d1> -> tensor<64x64xf32, #mma>
    %3 = tt.dot %x, %y, %z : tensor<64x32xf32, #d0> * tensor<32x64xf32, #d1> -> tensor<64x64xf32, #blocked>
    %4 = tt.dot %x, %y, %z {inputPrecision = 0 : i32} : tensor<64x32xf32, #d0> * tensor<32x64xf32, #d1> \
-> tensor<64x64xf32, #blocked>
    %5 = ttng.warp_group_dot_wait %1 {pendings = 0 : i32} : tensor<128x64xf32, #mma1>
}
""".replace("\\\n", "")


def test_ttgir_dots():
    dots = kv.ttgir_dots(TTGIR)
    assert [(d["unit"], d["dtype"], d["precision"]) for d in dots] == [
        ("wgmma", "f32", "tf32"),
        ("mma", "bf16", ""),
        ("fma", "f32", "ieee"),
        ("fma", "f32", "tf32"),
    ]
    assert [kv._tc_eligible(d) for d in dots] == [True, True, False, True]  # an fp32 ieee dot may use FMA


def test_sass_loops_and_counts():
    # prologue; outer loop 0x20..0x90 holding an MMA and an inner loop 0x40..0x60; a second loop 0xa0..0xb0
    ops = [
        "MOV",
        "S2R",
        "HGMMA.64x64x16",
        "FADD",
        "FFMA",
        "MUFU.EX2",
        "BRA 0x40",
        "FMNMX",
        "FADD",
        "BRA 0x20",
        "HMMA.16816",
        "BRA 0xa0",
        "EXIT",
    ]
    ins = [(16 * i, op.split()[0], " " + op.split()[1] if " " in op else "", False) for i, op in enumerate(ops)]
    s = kv.sass_summary(ins, inner_trips=3)
    assert s["loops"] == 3 and s["sass"] == 13 and s["sass_mma"] == 2
    assert s["loop_static"] == 8 and s["inner_loop_instr"] == 3  # outer body 0x20..0x90, inner 0x40..0x60
    assert s["loop_instr"] == 8 + 2 * 3 and s["loop_mufu"] == 3 and s["loop_mma"] == 1
    assert kv.sass_summary(ins, hot_loop=1)["loop_static"] == 2  # the second top-level MMA loop


def test_fast_path_skips_fallback_blocks():
    # loop 0x00..0x70: a conditional branch over a 3-instruction block to an unconditional branch over 1 more
    ops = [
        ("HGMMA", "", False),
        ("BRA", " 0x50", True),
        ("MUFU", "", False),
        ("MUFU", "", False),
        ("FADD", "", False),
        ("BRA", " 0x70", False),
        ("FMUL", "", False),
        ("BRA", " 0x0", True),
    ]
    ins = [(16 * i, op, rest, pred) for i, (op, rest, pred) in enumerate(ops)]
    s = kv.sass_summary(ins)
    assert s["loop_static"] == 8 and s["loop_instr"] == 4  # HGMMA, @P BRA 0x50, BRA 0x70, @P BRA 0x0


@pytest.mark.parametrize(
    "arch,regs,shared,warps,expect",
    [(90, 128, 100 * 1024, 4, 2), (90, 255, 0, 8, 1), (80, 64, 100 * 1024, 4, 1), (90, 32, 0, 4, 16)],
)
def test_occupancy(arch, regs, shared, warps, expect):
    assert kv.occupancy(regs, shared, warps, arch) == expect


def test_interpreted_kernel_is_refused():
    import triton.language as tl

    from kernels import contrastive_loss as cl

    if not cl.INTERPRET:
        pytest.skip("kernels built in compiled mode in this process")
    v = kv.Variant(
        op="x",
        kernel="fwd",
        case="c",
        dtype="bf16",
        fn=cl._fwd_kernel,
        args=dict(ACC=tl.float32),
        num_warps=4,
        num_stages=1,
        grid=(1,),
        flops=1.0,
        bytes=1.0,
    )
    with pytest.raises(TypeError, match="TRITON_INTERPRET unset or 0"):
        kv.analyze(v, 90)
