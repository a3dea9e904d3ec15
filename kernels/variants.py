"""What the compiler makes of each kernel config, without a GPU (issue 13 item 1; ``bench/kernel_report.py``).

Every kernel file ends with ``variants(shape, dtype) -> list[Variant]``: one :class:`Variant` per config its
launchers and autotuners can pick at that shape. :func:`analyze` builds a variant for sm_90a (H100/H200) or sm_80
(A100) with ``triton.compile`` exactly as the JIT would (same argument specialisation: pointers and ints divisible by
16, ints equal to 1) and reads the result: registers and spill bytes (``ptxas -v`` on the PTX), shared memory
against the target's per-block limit, tensor-core dots in TTGIR / PTX / SASS (``wgmma``, ``mma.sync``, HGMMA, HMMA)
and dots lowered to FMA, async copies (``cp.async``, TMA), SASS instruction counts of the main loop and per logit,
grid, occupancy and waves, compile time, and the FLOP / byte floor of the launch.

The kernels must have been decorated in compiled mode: import them with ``TRITON_INTERPRET`` unset or ``0``
(the report runs in its own process for that reason; the interpreter's ``@triton.jit`` cannot be compiled).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

# Per-target limits and floors. sm_90: H100 SXM figures of docs/kernels.md §4 (achieved bf16 matmul and HBM copy);
# sm_80: A100-SXM4-80GB datasheet figures (dense tensor-core peaks), marked as such in the report.
TARGETS: dict[int, dict[str, Any]] = {
    90: dict(
        name="sm_90a",
        sms=132,
        smem_block=227 * 1024,
        smem_sm=228 * 1024,
        regs_sm=65536,
        warps_sm=64,
        tflops={"bf16": 790.0, "fp16": 790.0, "tf32": 395.0, "fp32": 67.0, "fp64": 67.0},
        hbm_gbps=3000.0,
    ),
    80: dict(
        name="sm_80",
        sms=108,
        smem_block=163 * 1024,
        smem_sm=164 * 1024,
        regs_sm=65536,
        warps_sm=64,
        tflops={"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "fp64": 19.5},
        hbm_gbps=2039.0,
    ),
}
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class Variant:
    """One launchable kernel config at one shape.

    ``args`` holds every kernel argument by name as the launcher passes it: a ``torch.dtype`` for a pointer (a
    mock tensor of that dtype, 16-byte aligned like every torch allocation), ints / floats for scalars, and the
    constexpr values; :meth:`signature` and :meth:`constexprs` derive from it through Triton's own binder.
    """

    op: str  # "contrastive_loss", "assign_attention"
    kernel: str  # which launch: "fwd", "bwd_rows", ...
    case: str  # registry case name
    dtype: str  # input dtype label as launched: "bf16", "fp32-tf32", ...
    fn: Any  # the @triton.jit function (compiled mode)
    args: dict[str, Any]
    num_warps: int
    num_stages: int
    grid: tuple[int, ...]
    flops: float  # FLOP of this launch
    bytes: float  # HBM bytes of this launch (floor)
    logits_per_iter: float = 0  # logits of the op per main-loop iteration of one program (a logit recomputed
    #                             by n programs counts 1/n in each; 0: not a logit loop)
    inner_trips: int = 1  # trip count of the loops nested in the main loop (a runtime value in the kernel)
    hot_loop: int | None = None  # which top-level tensor-core loop (address order) is the main one; None: largest
    floor_dtype: str = "bf16"  # which tensor-core peak bounds the FLOPs: bf16, fp16, tf32, fp32 (FMA), fp64
    config: str = ""  # the autotune / launcher config in words, e.g. "BM=128 BN=64 w8 s2"
    meta: dict[str, Any] = field(default_factory=dict)  # extra columns (mode, K, ...)

    @property
    def name(self) -> str:
        return f"{self.op}/{self.kernel} {self.case} {self.dtype} {self.config}".strip()

    def _bind(self, target: int):
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

        if not isinstance(self.fn, JITFunction):
            raise TypeError(
                f"{self.name}: {type(self.fn).__name__} cannot be compiled; import the kernels with "
                f"TRITON_INTERPRET unset or 0 (compile in a process of its own)"
            )
        backend = make_backend(_gpu_target(target))
        binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)
        vals = {k: MockTensor(v) if isinstance(v, torch.dtype) else v for k, v in self.args.items()}
        missing = [p.name for p in self.fn.params if p.name not in vals]
        if missing:
            raise ValueError(f"{self.name}: no value for kernel arguments {missing}")
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        bound, spec, _ = binder(**vals, **opts)
        return backend, self.fn._pack_args(backend, opts, bound, spec, opts)

    def signature(self, target: int = 90) -> dict[str, str]:
        return self._bind(target)[1][1]

    def constexprs(self, target: int = 90) -> dict:
        return self._bind(target)[1][2]


def _gpu_target(arch: int):
    from triton.backends.compiler import GPUTarget

    if arch not in TARGETS:
        raise ValueError(f"unknown target {arch}; choose from {sorted(TARGETS)}")
    return GPUTarget("cuda", arch, 32)


def compile_variant(v: Variant, arch: int):
    """``(compiled kernel, seconds)`` for ``arch`` (90 -> sm_90a, 80 -> sm_80)."""
    from triton.compiler import ASTSource

    _, (options, signature, constexprs, attrs) = v._bind(arch)
    t0 = time.perf_counter()
    k = triton.compile(
        ASTSource(v.fn, signature, constexprs, attrs),
        target=_gpu_target(arch),
        options=dict(num_warps=v.num_warps, num_stages=v.num_stages),
    )
    return k, time.perf_counter() - t0


# ---- readers of the compiled artefacts --------------------------------------------------------------------------


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` (Triton's own call throws that log away)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run(
            [
                str(_BIN / "ptxas"),
                "-v",
                f"--gpu-name={TARGETS[arch]['name']}",
                str(src),
                "-o",
                str(Path(d) / "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(
        regs=int(regs.group(1)) if regs else 0,
        spill_stores=int(st.group(1)) if st else 0,
        spill_loads=int(st.group(2)) if st else 0,
        stack=int(stack.group(1)) if stack else 0,
    )


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_instructions(cubin: bytes) -> list[tuple[int, str, str, bool]]:
    """``(address, opcode, operands, predicated)`` of every SASS instruction (``cuobjdump -sass``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return [(int(m.group(1), 16), m.group(3), m.group(4), bool(m.group(2))) for m in _SASS_LINE.finditer(out)]


def _branch_target(ins, i: int) -> int | None:
    m = re.search(r"0x([0-9a-f]+)", ins[i][2]) if ins[i][1].startswith("BRA") else None
    return int(m.group(1), 16) if m else None


def _loops(ins) -> list[tuple[int, int]]:
    """``[first, last]`` instruction indices of every loop (a branch back to an earlier address)."""
    index = {ins[i][0]: i for i in range(len(ins))}
    out = []
    for i, (a, op, rest, *_) in enumerate(ins):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
                out.append((index[int(m.group(1), 16)], i))
    return out


_MMA = ("HGMMA", "HMMA", "DMMA", "IMMA")


def _count(ins, ops: tuple[str, ...]) -> int:
    return sum(1 for x in ins if x[1].split(".")[0] in ops)


def _shortest_path(ins, first: int, last: int) -> int:
    """Fewest instructions from ``first`` to ``last`` following the forward branches inside (a conditional branch
    may go either way; backward branches of nested loops fall through): the loop's fast path, without rarely
    taken fallback blocks."""
    index = {ins[i][0]: i for i in range(first, last + 1)}
    dist = {last: 1}
    for i in range(last - 1, first - 1, -1):
        target = _branch_target(ins, i)
        succ = [i + 1]
        if target is not None and target > ins[i][0] and target in index:
            succ = [index[target]] + ([i + 1] if ins[i][3] else [])
        dist[i] = 1 + min(dist[j] for j in succ)
    return dist[first]


def sass_summary(
    ins: list[tuple[int, str, str, bool]], inner_trips: int = 1, hot_loop: int | None = None
) -> dict[str, int]:
    """Whole-kernel counts and the main loop: the ``hot_loop``-th outermost loop holding tensor-core instructions
    in address order (``None``: the largest such loop; else the largest loop). ``loop_instr`` counts the
    instructions one main-loop iteration issues on its fast path (:func:`_shortest_path`) plus ``inner_trips - 1``
    more passes of each loop nested in it (their trip count is a runtime value); ``loop_static`` is its whole body
    (all branches); the per-opcode counts are over the whole body."""
    loops = _loops(ins)
    mma_loops = [lp for lp in loops if _count(ins[lp[0] : lp[1] + 1], _MMA)]
    pool = mma_loops or loops
    top = sorted(lp for lp in pool if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in pool))
    if hot_loop is not None and hot_loop < len(top):
        main = top[hot_loop]
    else:
        main = max(pool, key=lambda lp: lp[1] - lp[0], default=None)
    body = ins[main[0] : main[1] + 1] if main else []
    nested = [lp for lp in loops if main and lp != main and main[0] <= lp[0] and lp[1] <= main[1]]
    outer = [lp for lp in nested if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in nested)]
    extra = [ins[a : b + 1] for a, b in outer] * (inner_trips - 1)
    dyn = [i for part in [body, *extra] for i in part]
    return dict(
        sass=len(ins),
        sass_mma=_count(ins, _MMA),
        sass_ffma=_count(ins, ("FFMA",)),
        loops=len(loops),
        loop_static=len(body),
        loop_instr=(_shortest_path(ins, *main) + len(dyn) - len(body)) if main else 0,
        loop_mma=_count(dyn, _MMA),
        loop_ffma=_count(dyn, ("FFMA", "DFMA")),
        loop_mufu=_count(dyn, ("MUFU",)),
        loop_i64=sum(1 for x in dyn if x[1].startswith(("IADD.64", "IMAD.WIDE", "LEA.HI.X", "IADD3.X"))),
        inner_loop_instr=sum(b - a + 1 for a, b in outer),
        ldgsts=_count(ins, ("LDGSTS",)),
        tma=_count(ins, ("UTMALDG", "UBLKCP")),
    )


_PRECISIONS = {"0": "tf32", "1": "tf32x3", "2": "ieee", "3": "bf16x3", "4": "bf16x6"}  # triton's InputPrecision


def ttgir_dots(ttgir: str) -> list[dict[str, str]]:
    """Every dot of the TTGIR: operand dtype, input precision and the unit it lowers to (wgmma, mma, fma)."""
    enc = dict(re.findall(r"^(#[\w.]+) = (#[^\n]*)$", ttgir, re.M))
    dots = []
    for line in ttgir.splitlines():
        m = re.search(r"= (tt\.dot|ttng\.warp_group_dot) (.*)", line)
        if not m:
            continue
        a = re.search(r"(?:tensor|memdesc)<[0-9x]+x(\w+?)[,>]", m.group(2))
        prec = re.search(r"inputPrecision = (\w+)", line)  # an enum number in the printed IR
        res = re.search(r"-> tensor<[^,]+, (#[\w.]+)>", line)
        if m.group(1) == "ttng.warp_group_dot":
            unit = "wgmma"
        else:
            unit = "mma" if res and "nvidia_mma" in enc.get(res.group(1), "") else "fma"
        p = _PRECISIONS.get(prec.group(1), prec.group(1)) if prec else ("ieee" if a and a.group(1) == "f32" else "")
        dots.append(dict(dtype=a.group(1) if a else "?", precision=p, unit=unit))
    return dots


def occupancy(regs: int, shared: int, num_warps: int, arch: int) -> int:
    """Resident blocks per SM from registers (256-register warp granules), shared memory and warp slots."""
    t = TARGETS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = t["regs_sm"] // (per_warp * num_warps)
    by_smem = t["smem_sm"] // (shared + 1024) if shared else 32  # 1 KB per block reserved by the driver
    return max(0, min(by_regs, by_smem, t["warps_sm"] // num_warps, 32))


_cache: dict[tuple, dict] = {}  # per process: one compile per distinct specialisation (grids differ per case)


def analyze(v: Variant, arch: int) -> dict[str, Any]:
    """Compile ``v`` for ``arch`` (90 or 80) and return one report row (see the module docstring)."""
    _, (options, signature, constexprs, attrs) = v._bind(arch)
    key = (
        arch,
        v.fn.fn.__qualname__,
        v.fn.fn.__module__,
        str(signature),
        str(constexprs),
        str(attrs),
        v.num_warps,
        v.num_stages,
        v.inner_trips,
        v.hot_loop,
    )
    if key not in _cache:
        k, secs = compile_variant(v, arch)
        use = ptxas_usage(k.asm["ptx"], arch)
        ptx = k.asm["ptx"]
        dots = ttgir_dots(k.asm["ttgir"])
        _cache[key] = dict(
            **use,
            shared=k.metadata.shared,
            compile_s=round(secs, 2),
            ptx_wgmma=ptx.count("wgmma.mma_async."),
            ptx_mma_sync=len(re.findall(r"\bmma\.sync\.", ptx)),
            ptx_cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)\.", ptx)),
            ptx_tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
            dots=" ".join(f"{d['unit']}:{d['dtype']}{'/' + d['precision'] if d['precision'] else ''}" for d in dots),
            fma_dots=sum(d["unit"] == "fma" for d in dots),
            fma_tc_dots=sum(d["unit"] == "fma" and _tc_eligible(d) for d in dots),
            **sass_summary(sass_instructions(k.asm["cubin"]), v.inner_trips, v.hot_loop),
        )
    r = dict(_cache[key])
    t = TARGETS[arch]
    threads = 32 * v.num_warps
    programs = 1
    for g in v.grid:
        programs *= g
    occ = occupancy(r["regs"], r["shared"], v.num_warps, arch)
    peak = t["tflops"][v.floor_dtype] * 1e12
    floor_us = max(v.flops / peak, v.bytes / (t["hbm_gbps"] * 1e9)) * 1e6
    return dict(
        op=v.op,
        kernel=v.kernel,
        case=v.case,
        dtype=v.dtype,
        config=v.config,
        target=t["name"],
        num_warps=v.num_warps,
        num_stages=v.num_stages,
        **r,
        smem_limit=t["smem_block"],
        smem_ok=r["shared"] <= t["smem_block"],
        instr_per_logit=round(r["loop_instr"] * threads / v.logits_per_iter, 2) if v.logits_per_iter else None,
        grid="x".join(map(str, v.grid)),
        programs=programs,
        blocks_per_sm=occ,
        waves=round(programs / (t["sms"] * occ), 2) if occ else None,
        gflop=round(v.flops / 1e9, 3),
        mbytes=round(v.bytes / 1e6, 3),
        flop_per_byte=round(v.flops / v.bytes, 1) if v.bytes else None,
        floor_us=round(floor_us, 2),
        **v.meta,
    )


def _tc_eligible(dot: dict[str, str]) -> bool:
    """bf16 / fp16 dots, and fp32 dots at tf32 precision, belong on tensor cores."""
    return dot["dtype"] in ("bf16", "f16") or (dot["dtype"] == "f32" and dot["precision"].startswith("tf32"))


def gate_failures(row: dict[str, Any]) -> list[str]:
    """Why a report row must not be launchable: spills, shared memory over the limit, a tensor-core dot on FMA."""
    bad = []
    if row["spill_stores"] or row["spill_loads"]:
        bad.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if not row["smem_ok"]:
        bad.append(f"shared memory {row['shared']} B > {row['smem_limit']} B")
    if row["fma_tc_dots"]:
        bad.append(f"{row['fma_tc_dots']} bf16/fp16/tf32 dot(s) lowered to FMA ({row['dots']})")
    return bad
