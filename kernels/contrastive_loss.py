"""Fused contrastive loss (image-text InfoNCE and the multi-label soft-target loss) in Triton.

Same signature and semantics as :func:`kernels.reference.contrastive_loss` (the spec); the ``B x M`` logits matrix
``X = s * I T^T`` (``s = min(exp(theta), 100)``) is never materialised (kernels_notes.md §3):

* **forward** -- one pass over tiles of ``X`` recomputed on the fly gives both statistics: a running-max row LSE
  (each program walks a split of the column tiles for one row tile) and a per-tile column LSE. Partials go to
  ``[n_splits, B]`` and ``[n_row_tiles, M]`` buffers (``4*B*M/BLOCK`` bytes: 33.5 MB at B = M = 32768 with the
  128-row bf16/fp16 tiles; fp32 uses 64-row tiles at D = 256) and a deterministic torch logsumexp finishes them. Positive terms are O(B*D) dot products in torch.
* **backward** -- a row-block kernel (``dI``) and a column-block kernel (``dT``) recompute the tiles and form
  ``Gx = a (P_row - t/K) + b_j (P_col - t)`` (``t`` marks the positive pairs, ``a = g/(2B)``,
  ``b_j = g_owner(j)/(2BK)``) in
  fp32 before the single cast to the input dtype: ``dI = s Gx T``, ``dT = s Gx^T I``, and row/column sums of
  ``Gx o R`` give ``dL/ds``; ``theta``'s gradient goes through torch's ``clamp(exp(theta), max=100)`` exactly as in
  the reference (zero where the clamp is active). Each gradient element is written by exactly one program: no
  atomics, bitwise deterministic. Extra memory: O(B + M) (gradients are written in the input dtype; with W > 1
  the cross-rank ``dT`` sum is an fp32 ``[W*B*K, D]`` buffer).
* numerics: logits in base 2 (``log2 e`` folded into the scale, ``exp2``), fp32 accumulation and LSEs for
  fp16/bf16/fp32 inputs, fp64 throughout for fp64 inputs (gradcheck). fp32 ``tl.dot`` follows
  ``torch.get_float32_matmul_precision()`` (``"highest"`` -> ieee, else tf32).

**Distributed** (initialised ``torch.distributed``, world size W > 1, ``B`` local rows, ``K`` prompts): rank r owns
rows ``rank*B ...`` of the global ``[W*B, W*B*K]`` matrix. Only the *texts* are gathered (the local rows need every
column; no rank needs other ranks' images): each rank computes its ``[B, W*B*K]`` block, its row LSEs are complete,
and the column LSEs of the global matrix are the logsumexp over ranks of the per-rank partial column LSEs
(all_gather of the partials, DINOv3 style), so one pass serves both directions. Backward: ``dI`` is complete
locally; ``dT`` for all W*B*K columns is summed over ranks (all_reduce, then this rank's slice: works on every backend
incl. gloo); the column part of ``dL_r/ds`` needs the column sums of all ranks restricted to rank r's columns
(all_reduce of a W-vector). The upstream gradients ``g_r`` of all ranks are all-gathered (W scalars) so that the
gradients equal those of the reference's ``all_gather_with_grad`` scheme exactly: rank r's features get
``d(sum_q g_q L_q)/d(features_r)``, ``theta`` on rank r gets ``g_r dL_r/dtheta`` (not summed; DDP averages it).

Communication per rank and step (elements received; E = element size of the features):
  forward:  texts all_gather ``(W-1)*B*K*D`` (E bytes each) + partial column LSEs all_gather ``(W-1)*W*B*K`` fp32
            (= W/D of the text volume) + one int flag all_reduce when the non-finite check is on;
  backward: ``g`` all_gather W scalars, ``dT`` all_reduce of ``W*B*K*D`` fp32 (a ring moves ~2(W-1)/W of it),
            column-sum all_reduce W scalars.
The reference moves more: images and texts all_gathered and both gradient buffers all_reduced.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

from kernels import reference

__all__ = ["contrastive_loss", "set_check_finite"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_D = 512  # tiles hold the whole embedding dim; larger D would not fit registers/shared memory on the GPU
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Interpreter: one fixed config with few, large programs. GPU: see _fwd_block and the autotune configs below.
_INTERP_BLOCK = 64
_check_finite = True


def set_check_finite(enabled: bool) -> None:
    """Turn the non-finite input check on (default) or off. It costs one host sync per call on the GPU."""
    global _check_finite
    _check_finite = bool(enabled)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, n_rows, stride, offs_d, D, UPCAST: tl.constexpr):
    """Load a ``[len(rows), BLOCK_D]`` tile of a row-major matrix, zero outside; bf16 -> fp32 if UPCAST."""
    mask = (rows < n_rows)[:, None] & (offs_d < D)[None, :]
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_kernel(img_ptr, txt_ptr, scale2_ptr, row_part_ptr, col_part_ptr,
                B, M, D, stride_i, stride_t, n_col_tiles, tiles_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Program (row tile, column split): base-2 row LSE over the split (running max) -> row_part[split, rows];
    base-2 column LSE over the row tile of every visited column tile -> col_part[row_tile, cols]."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    a = _load_rows(img_ptr, rows, B, stride_i, offs_d, D, UPCAST)  # [BM, BD]
    scale2 = tl.load(scale2_ptr)  # s * log2(e)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_col_tiles)
    for t in range(t0, t1):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        bt = _load_rows(txt_ptr, cols, M, stride_t, offs_d, D, UPCAST)  # [BN, BD]
        x = tl.dot(a, tl.trans(bt), input_precision=PRECISION) * scale2  # [BM, BN] base-2 logits
        x = tl.where(row_ok[:, None] & col_ok[None, :], x, float("-inf"))
        # rows: online logsumexp (padded rows stay at -inf without producing NaN)
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(x - m_use[:, None]), 1)
        m_i = m_new
        # columns: exact LSE over this row tile
        cm = tl.max(x, 0)
        cm_use = tl.where(cm == float("-inf"), 0.0, cm)
        cl = tl.where(col_ok, tl.sum(tl.exp2(x - cm_use[None, :]), 0), 1.0)  # padded columns: no log2(0)
        tl.store(col_part_ptr + pid_m.to(tl.int64) * M + cols, cm_use + tl.log2(cl), mask=col_ok)
    l_i = tl.where(row_ok, l_i, 1.0)  # padded rows: no log2(0)
    tl.store(row_part_ptr + pid_s.to(tl.int64) * B + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_rows_kernel(img_ptr, txt_ptr, scale2_ptr, r2_ptr, c2_ptr, roww_ptr, colw_ptr, out_scale_ptr,
                     di_ptr, rowsum_ptr, B, M, D, stride_i, stride_t, col0, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Program per row tile, loop over all column tiles:
    ``dI = out_scale * Gx T`` [BM, D] in di's dtype and ``rowsum_i = sum_j (P_row - t_row)_ij R_ij``, where
    ``Gx = roww (P_row - t/K) + colw_j (P_col - t)`` and ``t`` marks the positives (local row i, column
    ``col0 + i*K + k``)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    a = _load_rows(img_ptr, rows, B, stride_i, offs_d, D, UPCAST)  # [BM, BD]
    scale2 = tl.load(scale2_ptr)
    roww = tl.load(roww_ptr)
    r2 = tl.load(r2_ptr + rows, mask=row_ok, other=0.0)
    first = rows * K  # first positive column of each row, relative to col0
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    rs = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        bt = _load_rows(txt_ptr, cols, M, stride_t, offs_d, D, UPCAST)  # [BN, BD]
        c2 = tl.load(c2_ptr + cols, mask=col_ok, other=0.0)
        cw = tl.load(colw_ptr + cols, mask=col_ok, other=0.0)
        r = tl.dot(a, tl.trans(bt), input_precision=PRECISION)  # [BM, BN] cosine similarities
        x = tl.where(row_ok[:, None] & col_ok[None, :], r * scale2, float("-inf"))
        jj = (cols - col0)[None, :]
        t = ((jj >= first[:, None]) & (jj < first[:, None] + K) & row_ok[:, None]).to(ACC)
        g_row = tl.exp2(x - r2[:, None]) - t / K
        g_col = tl.exp2(x - c2[None, :]) - t
        rs += tl.sum(g_row * r, 1)
        gx = roww * g_row + cw[None, :] * g_col
        acc = tl.dot(gx.to(bt.dtype), bt, acc, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * tl.load(out_scale_ptr)
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    tl.store(di_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :], acc.to(di_ptr.dtype.element_ty), mask=mask)
    tl.store(rowsum_ptr + rows, rs, mask=row_ok)


@triton.jit
def _bwd_cols_kernel(img_ptr, txt_ptr, scale2_ptr, r2_ptr, c2_ptr, roww_ptr, colw_ptr, out_scale_ptr,
                     dt_ptr, colsum_ptr, B, M, D, stride_i, stride_t, col0, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Program per column tile, loop over all row tiles (tiles held transposed, ``[BN, BM]``):
    ``dT = out_scale * Gx^T I`` [BN, D] in dt's dtype and ``colsum_j = sum_i (P_col - t)_ij R_ij``."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    bt = _load_rows(txt_ptr, cols, M, stride_t, offs_d, D, UPCAST)  # [BN, BD]
    scale2 = tl.load(scale2_ptr)
    roww = tl.load(roww_ptr)
    c2 = tl.load(c2_ptr + cols, mask=col_ok, other=0.0)
    cw = tl.load(colw_ptr + cols, mask=col_ok, other=0.0)
    jj = (cols - col0)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    cs = tl.zeros([BLOCK_N], ACC)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        a = _load_rows(img_ptr, rows, B, stride_i, offs_d, D, UPCAST)  # [BM, BD]
        r2 = tl.load(r2_ptr + rows, mask=row_ok, other=0.0)
        rt = tl.dot(bt, tl.trans(a), input_precision=PRECISION)  # [BN, BM] = R^T
        x = tl.where(col_ok[:, None] & row_ok[None, :], rt * scale2, float("-inf"))
        first = (rows * K)[None, :]
        t = ((jj >= first) & (jj < first + K) & row_ok[None, :]).to(ACC)
        g_row = tl.exp2(x - r2[None, :]) - t / K
        g_col = tl.exp2(x - c2[:, None]) - t
        cs += tl.sum(g_col * rt, 1)
        gx = roww * g_row + cw[:, None] * g_col
        acc = tl.dot(gx.to(a.dtype), a, acc, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * tl.load(out_scale_ptr)
    mask = col_ok[:, None] & (offs_d < D)[None, :]
    tl.store(dt_ptr + cols.to(tl.int64)[:, None] * D + offs_d[None, :], acc.to(dt_ptr.dtype.element_ty), mask=mask)
    tl.store(colsum_ptr + cols, cs, mask=col_ok)


# Shared memory: the kernels keep whole-D tiles, so the tile sizes follow D and the element size. Measured on sm_90
# (triton 3.6, D = 256): forward 128x128 bf16 = 128 KB, 64x64 fp32 = 128 KB (1 stage); backward bf16
# ~(BM + BN)*D*2 bytes, fp32/fp64 ~(BM + BN + BN or BM)*D*E (the transposed operand of the tf32/fp64 dot gets its own
# copy). The H100 limit is 227 KB per block.
_SMEM_BUDGET = 224 * 1024


def _fwd_block(block_d: int, elsize: int) -> int:
    """Square forward tile: 128 for 16-bit inputs at D <= 256, smaller for wider elements or D (A + B tiles <= 128 KB)."""
    return max(16, min(128, triton.next_power_of_2(65536 // (block_d * elsize) + 1) // 2))


def _prune_bwd(configs, named_args, **kwargs):
    """Drop backward configs whose whole-D tiles would not fit shared memory (estimate above); keep >= 1."""
    elsize, block_d = named_args["img_ptr"].element_size(), kwargs["BLOCK_D"]
    rows = "di_ptr" in named_args

    def smem(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        extra = 0 if elsize == 2 else (bn if rows else bm)
        return (bm + bn + extra) * block_d * elsize

    fits = [c for c in configs if smem(c) <= _SMEM_BUDGET]
    return fits or [min(configs, key=smem)]


if INTERPRET:  # autotune with >= 2 configs cannot run under the interpreter
    _fwd_launch, _rows_launch, _cols_launch = _fwd_kernel, _bwd_rows_kernel, _bwd_cols_kernel
else:
    _fwd_launch = triton.autotune(  # tiles fixed by _fwd_block (the partial buffers depend on them)
        configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)],
        key=["B", "M", "D"],
    )(_fwd_kernel)
    _BWD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w in ((128, 64, 8), (64, 128, 8), (128, 128, 8), (64, 64, 4), (64, 64, 8), (64, 32, 4),
                          (32, 64, 4), (32, 32, 4), (32, 16, 4), (16, 32, 4))
        for s in (1, 2)
    ]
    _rows_launch = triton.autotune(configs=_BWD_CONFIGS, key=["B", "M", "D"],
                                   prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_rows_kernel)
    _cols_launch = triton.autotune(configs=_BWD_CONFIGS, key=["B", "M", "D"],
                                   prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_cols_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops so that torch.compile treats them as opaque calls
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_consts(x: Tensor) -> dict:
    cd = _compute_dtype(x.dtype)
    if x.dtype == torch.float32:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "ieee"  # ignored for fp16/bf16; fp64 must be ieee
    return dict(BLOCK_D=max(16, triton.next_power_of_2(x.shape[1])), UPCAST=INTERPRET and x.dtype == torch.bfloat16,
                PRECISION=precision, ACC=tl.float64 if cd == torch.float64 else tl.float32)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _lse2(parts: Tensor) -> Tensor:
    """Deterministic base-2 logsumexp over dim 0 of ``[P, N]`` partials (entries may be -inf); overwrites ``parts``."""
    m = parts.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m + parts.sub_(m).exp2_().sum(dim=0).log2()


def _positive_cosines(image: Tensor, text: Tensor, k: int, cd: torch.dtype, chunk: int = 4096) -> Tensor:
    """``[B, K]`` cosines ``image_i . text_{i*K+k}`` in ``cd``, a chunk of rows at a time (no [B*K, D] fp32 copy)."""
    b, d = image.shape
    return torch.cat([(image[a : a + chunk].to(cd).unsqueeze(1)
                       * text[a * k : (a + chunk) * k].to(cd).view(-1, k, d)).sum(-1) for a in range(0, b, chunk)])


@torch.library.custom_op("groupvit::contrastive_lse", mutates_args=())
def _lse_op(image: Tensor, text: Tensor, scale2: Tensor, check_finite: bool) -> tuple[Tensor, Tensor]:
    """Base-2 row LSE ``[B]`` and (this rank's partial) column LSE ``[M]`` of ``X = s I T^T``; ``scale2 = s log2 e``."""
    if check_finite:
        _raise_if_nonfinite(image, text, scale2)
    b, d = image.shape
    m = text.shape[0]
    cd = _compute_dtype(image.dtype)
    consts = _kernel_consts(image)
    block = _INTERP_BLOCK if INTERPRET else _fwd_block(consts["BLOCK_D"], image.element_size())
    n_row, n_col = triton.cdiv(b, block), triton.cdiv(m, block)
    if INTERPRET:
        want = 2  # exercise the cross-split merge in CI while keeping few programs
    else:
        index = image.device.index if image.device.index is not None else torch.cuda.current_device()
        want = max(1, triton.cdiv(4 * _num_sms(index), n_row))  # ~4 programs per SM
    per_split = triton.cdiv(n_col, min(n_col, want))
    n_split = triton.cdiv(n_col, per_split)
    row_part = torch.empty(n_split, b, device=image.device, dtype=cd)  # [S, B]
    col_part = torch.empty(n_row, m, device=image.device, dtype=cd)  # [B/BM, M]
    _fwd_launch[(n_row, n_split)](
        image, text, scale2, row_part, col_part, b, m, d, image.stride(0), text.stride(0), n_col, per_split,
        BLOCK_M=block, BLOCK_N=block, **consts)
    return _lse2(row_part), _lse2(col_part)


@_lse_op.register_fake
def _(image: Tensor, text: Tensor, scale2: Tensor, check_finite: bool) -> tuple[Tensor, Tensor]:
    cd = _compute_dtype(image.dtype)
    return image.new_empty(image.shape[0], dtype=cd), image.new_empty(text.shape[0], dtype=cd)


@torch.library.custom_op("groupvit::contrastive_grads", mutates_args=())
def _grads_op(image: Tensor, text: Tensor, scale2: Tensor, r2: Tensor, c2: Tensor, roww: Tensor, colw: Tensor,
              di_scale: Tensor, dt_scale: Tensor, col0: int, k: int, dt_full: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dI [B,D]``, ``dT [M,D]``, ``rowsum [B]``, ``colsum [M]`` with ``Gx = roww (P_row - t/K) + colw_j (P_col - t)``
    (positives ``t`` at local row i, column ``col0 + i*K + k``); ``dI``/``dT`` are scaled by ``di_scale``/``dt_scale``
    and come in the input dtype, except ``dT`` in the compute dtype when ``dt_full`` (to be summed over ranks)."""
    b, d = image.shape
    m = text.shape[0]
    cd = _compute_dtype(image.dtype)
    out_dtype = cd if (INTERPRET and image.dtype == torch.bfloat16) else image.dtype  # interpreter bf16 casts truncate
    di = torch.empty(b, d, device=image.device, dtype=out_dtype)
    dt = torch.empty(m, d, device=image.device, dtype=cd if dt_full else out_dtype)
    rowsum = torch.empty(b, device=image.device, dtype=cd)
    colsum = torch.empty(m, device=image.device, dtype=cd)
    consts = _kernel_consts(image)
    if INTERPRET:
        consts.update(BLOCK_M=_INTERP_BLOCK, BLOCK_N=_INTERP_BLOCK)
    args = (image, text, scale2, r2, c2, roww, colw)
    sizes = (b, m, d, image.stride(0), text.stride(0), col0, k)
    _rows_launch[lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)](*args, di_scale, di, rowsum, *sizes, **consts)
    _cols_launch[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]),)](*args, dt_scale, dt, colsum, *sizes, **consts)
    return di.to(image.dtype), (dt if dt_full else dt.to(image.dtype)), rowsum, colsum


@_grads_op.register_fake
def _(image: Tensor, text: Tensor, scale2: Tensor, r2: Tensor, c2: Tensor, roww: Tensor, colw: Tensor,
      di_scale: Tensor, dt_scale: Tensor, col0: int, k: int, dt_full: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cd = _compute_dtype(image.dtype)
    b, m, d = image.shape[0], text.shape[0], image.shape[1]
    return (image.new_empty(b, d), image.new_empty(m, d, dtype=cd if dt_full else image.dtype),
            image.new_empty(b, dtype=cd), image.new_empty(m, dtype=cd))


def _raise_if_nonfinite(image: Tensor, text: Tensor, scale: Tensor) -> None:
    ok = torch.isfinite(image).all() & torch.isfinite(text).all() & torch.isfinite(scale).all()
    if not bool(ok):
        bad = [n for n, t in (("image", image), ("text", text), ("logit scale", scale)) if not torch.isfinite(t).all()]
        raise ValueError(f"contrastive_loss: non-finite values (NaN/Inf) in {', '.join(bad)} "
                         f"(image {tuple(image.shape)}, text {tuple(text.shape)}); on other ranks if none listed")


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


def _all_gather(x: Tensor, group, world: int) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class _ContrastiveLoss(torch.autograd.Function):
    """``(image [B,D], text [B*K,D], scale [1]) -> loss`` of this rank; ``scale`` is the clamped ``s``."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, k: int, group, world: int, rank: int,
                check: bool) -> Tensor:  # type: ignore[override]
        b, d = image.shape
        cd = scale.dtype
        scale2 = scale * LOG2E  # [1]
        if world > 1:
            if check:  # every rank raises together instead of leaving the others hanging in a collective
                flag = torch.stack([torch.isfinite(t).all() for t in (image, text, scale)]).all().to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
                if not bool(flag):
                    _raise_if_nonfinite(image, text, scale)
                    raise ValueError(f"contrastive_loss: non-finite values (NaN/Inf) on another rank "
                                     f"(local image {tuple(image.shape)}, text {tuple(text.shape)})")
            txt_all = _all_gather(text, group, world)  # [W*B*K, D]
            r2, c2p = torch.ops.groupvit.contrastive_lse(image, txt_all, scale2, False)
            c2 = _lse2(_all_gather(c2p, group, world).view(world, -1))  # [W*B*K] global column LSEs
        else:
            txt_all = text
            r2, c2 = torch.ops.groupvit.contrastive_lse(image, txt_all, scale2, check)
        col0 = rank * b * k
        rpos = _positive_cosines(image, text, k, cd)  # [B, K]
        img_loss = (r2 - scale2 * rpos.mean(dim=1)).mean()  # per-row differences first: no cancellation of means
        txt_loss = (c2[col0 : col0 + b * k].view(b, k) - scale2 * rpos).mean()
        loss = 0.5 * LN2 * (img_loss + txt_loss)
        ctx.save_for_backward(image, text, txt_all, scale, r2, c2)
        ctx.k, ctx.group, ctx.world, ctx.rank = k, group, world, rank
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        image, text, txt_all, scale, r2, c2 = ctx.saved_tensors
        k, group, world, rank = ctx.k, ctx.group, ctx.world, ctx.rank
        b = image.shape[0]
        cd = scale.dtype
        alpha, beta = 0.5 / b, 0.5 / (b * k)  # dL_r/d(row term), dL_r/d(column term), per element
        g = g.to(cd).reshape(1)
        g_all = _all_gather(g, group, world) if world > 1 else g  # [W]: column j's loss belongs to rank j // (B*K)
        # Weights divided by a norm shared by all ranks keep Gx O(1) before the kernels cast it to the input dtype
        # (alpha = 1/(2B) would push fp16 Gx into the subnormal range at large B); the norm is multiplied back.
        norm = g_all.abs().amax() * max(alpha, beta)
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        roww = g * alpha  # [1]
        colw = (g_all * beta).repeat_interleave(b * k)  # [W*B*K]
        out_scale = (norm * scale).reshape(1)  # dI = s * Gx T
        d_image, dt, rowsum, colsum = torch.ops.groupvit.contrastive_grads(
            image, txt_all, scale * LOG2E, r2, c2, roww / norm, colw / norm, out_scale,
            torch.ones_like(out_scale) if world > 1 else out_scale, rank * b * k, k, world > 1)
        colsum_rank = colsum.view(world, b * k).sum(dim=1)  # [W] column sums of (P_col - t) * R per owning rank
        if world > 1:
            dist.all_reduce(dt, group=group)  # sum the local-row contributions of all ranks, then keep ours
            dist.all_reduce(colsum_rank, group=group)
            d_text = (dt[rank * b * k : (rank + 1) * b * k] * out_scale).to(text.dtype)
        else:
            d_text = dt
        d_scale = roww * rowsum.sum() + g * beta * colsum_rank[rank]  # dL_r/ds
        return d_image, d_text, d_scale.reshape(scale.shape), None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------------


def contrastive_loss(
    image: Tensor, text: Tensor, logit_scale: Tensor, *, num_prompts: int = 1, group=None
) -> Tensor:
    """GroupViT's contrastive loss for this rank, fused; spec: :func:`kernels.reference.contrastive_loss`.

    Args:
        image: L2-normalised image embeddings of this rank ``[B, D]`` (fp16/bf16/fp32/fp64, D <= 512).
        text: L2-normalised text embeddings ``[B*K, D]`` (prompt k of image i at row ``i*K + k``).
        logit_scale: raw temperature parameter ``theta`` (one element); logits are ``min(exp(theta), 100) * I T^T``.
        num_prompts: K (1: image-text InfoNCE; > 1: multi-label loss with soft targets 1/K).
        group: process group; with an initialised ``torch.distributed`` of world size > 1 the columns are all
            ranks' texts (rank-major) and the loss is this rank's local-row loss.

    Returns:
        0-dim loss ``0.5 * (mean over image rows + mean over text rows)``, fp32 (fp64 for fp64 inputs).
    """
    reference._check_contrastive(image, text, logit_scale, num_prompts)
    if not (image.is_floating_point() and text.is_floating_point()):
        raise TypeError(f"contrastive_loss: floating-point features required, got {image.dtype} and {text.dtype}")
    dt = torch.promote_types(image.dtype, text.dtype)
    if dt not in _DTYPES:
        raise TypeError(f"contrastive_loss (triton): unsupported dtype {dt}; use one of {_DTYPES}")
    if image.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"contrastive_loss (triton): got {image.device} tensors (image {tuple(image.shape)}, text "
                         f"{tuple(text.shape)}); the Triton kernels need a GPU: use CUDA tensors or "
                         f"ops.set_backend('eager') (or set TRITON_INTERPRET=1 before importing the kernels)")
    if image.shape[1] > MAX_D:
        raise ValueError(f"contrastive_loss (triton): embedding dim {image.shape[1]} > {MAX_D} is not supported "
                         f"(image {tuple(image.shape)}); use ops.set_backend('eager')")
    cd = _compute_dtype(dt)
    world = dist.get_world_size(group) if (dist.is_available() and dist.is_initialized()) else 1
    rank = dist.get_rank(group) if world > 1 else 0
    scale = reference.clamped_scale(logit_scale.to(device=image.device, dtype=cd)).reshape(1)  # [1], autograd
    return _ContrastiveLoss.apply(image.to(dt).contiguous(), text.to(dt).contiguous(), scale, num_prompts, group,
                                  world, rank, _check_finite)


# ----------------------------------------------------------------------------------------------------------------
# Every config the launchers and autotuners above can pick (compiled-code report: kernels/variants.py)
# ----------------------------------------------------------------------------------------------------------------


def variants(shape: dict[str, int], dtype: torch.dtype, num_sms: int = 132) -> list:
    """One :class:`kernels.variants.Variant` per launchable config at ``shape`` (registry dims ``B, D, K``) and
    input ``dtype`` (fp32: both matmul precisions), for a GPU with ``num_sms`` SMs. Keep in sync with the launchers."""
    from kernels.variants import Variant

    b, d, k = shape["B"], shape["D"], shape.get("K", 1)
    m = b * k
    es = torch.empty((), dtype=dtype).element_size()
    block_d = max(16, triton.next_power_of_2(d))
    precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    floor = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    out = []
    for prec in precisions:
        label = f"{name}-{prec}" if dtype == torch.float32 else name
        fl = floor.get(dtype, "tf32" if prec == "tf32" else "fp32")
        consts = dict(BLOCK_D=block_d, UPCAST=False, PRECISION=prec, ACC=acc)
        case = dict(op="contrastive_loss", case=f"B{b}-D{d}-K{k}", dtype=label, floor_dtype=fl,
                    meta=dict(mode=f"K={k}"))
        # forward: tiles fixed by _fwd_block, autotuned warps x stages; grid as in _lse_op
        blk = _fwd_block(block_d, es)
        n_row, n_col = triton.cdiv(b, blk), triton.cdiv(m, blk)
        per_split = triton.cdiv(n_col, min(n_col, max(1, triton.cdiv(4 * num_sms, n_row))))
        n_split = triton.cdiv(n_col, per_split)
        for c in _fwd_launch.configs:
            out.append(Variant(
                kernel="fwd", fn=_fwd_kernel, num_warps=c.num_warps, num_stages=c.num_stages, grid=(n_row, n_split),
                args=dict(img_ptr=dtype, txt_ptr=dtype, scale2_ptr=torch.float32, row_part_ptr=torch.float32,
                          col_part_ptr=torch.float32, B=b, M=m, D=d, stride_i=d, stride_t=d, n_col_tiles=n_col,
                          tiles_per_split=per_split, BLOCK_M=blk, BLOCK_N=blk, **consts),
                flops=2.0 * b * m * d, bytes=(b + m) * d * es + 4.0 * (n_split * b + n_row * m),
                logits_per_iter=blk * blk, config=f"BM={blk} BN={blk} w{c.num_warps} s{c.num_stages}", **case))
        # backward: the autotuned configs that survive _prune_bwd
        for kname, fn, launch in (("bwd_rows", _bwd_rows_kernel, _rows_launch), ("bwd_cols", _bwd_cols_kernel,
                                                                                 _cols_launch)):
            rows = kname == "bwd_rows"
            mock = {"img_ptr": torch.empty(0, dtype=dtype, device="meta"), **({"di_ptr": None} if rows else {})}
            for c in _prune_bwd(launch.configs, mock, BLOCK_D=block_d):
                bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                ptrs = dict(img_ptr=dtype, txt_ptr=dtype, scale2_ptr=torch.float32, r2_ptr=torch.float32,
                            c2_ptr=torch.float32, roww_ptr=torch.float32, colw_ptr=torch.float32,
                            out_scale_ptr=torch.float32, rowsum_ptr=torch.float32, colsum_ptr=torch.float32,
                            di_ptr=dtype, dt_ptr=dtype)
                args = {p.name: ptrs[p.name] for p in fn.params if p.name in ptrs}
                out.append(Variant(
                    kernel=kname, fn=fn, num_warps=c.num_warps, num_stages=c.num_stages,
                    grid=(triton.cdiv(b, bm) if rows else triton.cdiv(m, bn),),
                    args=dict(args, B=b, M=m, D=d, stride_i=d, stride_t=d, col0=0, K=k, BLOCK_M=bm, BLOCK_N=bn,
                              **consts),
                    flops=4.0 * b * m * d, bytes=((2 * b + m) if rows else (b + 2 * m)) * d * es,
                    logits_per_iter=bm * bn, config=f"BM={bm} BN={bn} w{c.num_warps} s{c.num_stages}", **case))
    return out
