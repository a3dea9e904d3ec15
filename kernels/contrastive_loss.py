"""Fused contrastive loss (image-text InfoNCE and the multi-label soft-target loss) in Triton.

Same signature and semantics as :func:`kernels.reference.contrastive_loss` (the spec); the ``B x M`` logits matrix
``X = s * I T^T`` (``s = min(exp(theta), 100)``) is never materialised (kernels_notes.md §3):

* **forward** -- one pass over tiles of ``X`` recomputed on the fly gives both statistics. A program keeps a
  256-row image tile resident (fp32: four 64-row tiles one after the other, ``GROUP``) as the dot's second operand
  and walks a split of the text tiles: tiles are ``[texts, images]``, so each text's LSE over the tile reduces along
  the accumulator's cheap axis (in-thread, then a quad) and the row sums accumulate in a per-thread register
  partial, reduced once after the loop. No running max: every base-2 logit is taken relative to one anchor per
  launch (``_ANCHOR``), and a sum outside the anchor's window is recomputed exactly (in-tile for the texts, a second
  ``FIX_ROWS`` launch for the rows; rare). Per logit (report: bench/results/kernel_report.md): one FFMA (the scale
  folded into the exponent), one ``ex2.approx.ftz``, two FADDs; full tiles of a full row tile skip every mask, the
  ragged ones run in a second loop; the tiles move by scalar 64-bit base pointers (32-bit offsets inside a tile).
  Partials go to ``[n_splits, B]`` and ``[B / 256, M]`` fp32 buffers at D = 256 (column LSEs over 256 rows:
  50 MB at B = 32768, K = 3, every target and dtype); a deterministic torch logsumexp finishes them. Positive terms
  are O(B*K*D) dot products in torch.
* **backward** -- a row-block kernel (``dI``) and a column-block kernel (``dT``) recompute the tiles and form
  ``Gx = a (P_row - t/K) + b_j (P_col - t)`` (``t`` marks the positive pairs, ``a = g/(2B)``,
  ``b_j = g_owner(j)/(2BK)``) in fp32 before the single cast to the input dtype: ``dI = s Gx T``, ``dT = s Gx^T I``,
  and row/column sums of ``Gx o R`` give ``dL/ds``; ``theta``'s gradient goes through torch's
  ``clamp(exp(theta), max=100)`` exactly as in the reference (zero where the clamp is active). Each loop runs in
  four parts: full tiles before the tiles that hold the positives, those tiles (positives and load masks), full
  tiles after them, the ragged last tile. No logit masks are needed: a padded row or column has zero features and
  adds nothing. Each gradient element is written by exactly one program: no atomics, bitwise deterministic. Extra
  memory: O(B + M) (gradients are written in the input dtype; with W > 1 the cross-rank ``dT`` sum is an fp32
  ``[W*B*K, D]`` buffer).
* numerics: logits in base 2 (``log2 e`` folded into the scale, ``exp2``), fp32 accumulation and LSEs for
  fp16/bf16/fp32 inputs, fp64 throughout for fp64 inputs (gradcheck, under the interpreter only: on the GPU every
  fp64 config spilled). fp32 dots always run on tensor cores as ``tf32`` (10-bit mantissa operands), whatever the
  torch matmul precision: ``ieee`` lowers to FMA and ``tf32x3`` spilled in every config (report).

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

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

from kernels import reference
from kernels.utils import DTYPES, INTERPRET, compute_dtype, triton_can_launch

__all__ = ["contrastive_loss", "set_check_finite"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_D = 512  # tiles hold the whole embedding dim; larger D would not fit registers/shared memory on the GPU

# Interpreter: one fixed config with few, large programs. GPU: see _fwd_tiles and the autotune configs below.
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
def _load(ptrs, row_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """Load a ``[rows, BLOCK_D]`` tile; masks only on ragged tiles (``MASKED``) and when ``D < BLOCK_D``."""
    if MASKED:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:  # interpreter: bf16 arithmetic is broken there, compute in fp32
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_offs(stride, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """32-bit element offsets of a ``[BLOCK, BLOCK_D]`` row-major tile; tiles move by a scalar 64-bit base pointer."""
    return tl.arange(0, BLOCK)[:, None] * stride + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """``log2``; ``FAST``: one MUFU.LG2 (``lg2.approx``, absolute error ~2^-22; GPU fp32 only) instead of libdevice's
    ~15-instruction polynomial, which the report showed costing ~3 instructions per logit for the column LSEs."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


# Base-2 logits ``x = s2 r`` (s2 = s log2 e) are summed relative to one anchor per launch, ``a2 = max(s2 -
# _ANCHOR, 0)``: unit vectors have |x| <= s2, so every term is <= 2^_ANCHOR and no running max is needed, and the
# exponent ``x - a2`` is rounded no coarser than the eager reference's fp32 logits (a2 = 0 up to s = 69). A sum is
# exact when its log2 lies in [_WIN_LO, _WIN_HI] relative to a2: below, terms flushed to zero (< 2^-126, up to 2^24
# of them) could matter (relative error <= 2^-24); above, a sum could overflow fp32 (non-unit inputs). Outside the
# window the kernel recomputes that sum exactly with a max (rare: at s = 100, unit vectors, a text whose best
# cosine over a 256-image tile is below -0.23).
_ANCHOR = tl.constexpr(100.0)
_WIN_LO = tl.constexpr(-78.0)
_WIN_HI = tl.constexpr(126.0)


@triton.jit
def _out_of_window(lg, ok):
    """Whether some valid (``ok``) base-2 log-sum ``lg`` (relative to the anchor) lies outside the window."""
    dev = tl.where(ok, tl.abs(lg - 0.5 * (_WIN_LO + _WIN_HI)), 0.0)
    return tl.max(dev, 0) > 0.5 * (_WIN_HI - _WIN_LO)


@triton.jit
def _cosines(bt, at, txt_ok, img_ok, MASKED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """``[BN, BM]`` cosines (texts x images) of a text tile and the resident image tile; ``MASKED``: ``-inf``
    outside the valid texts and images."""
    r = tl.dot(bt, at, input_precision=PRECISION, out_dtype=ACC)
    if MASKED:
        r = tl.where(txt_ok[:, None] & img_ok[None, :], r, float("-inf"))
    return r


@triton.jit
def _fwd_tile(
    bt,
    at,
    l2d,
    s2,
    a2,
    txt_ok,
    img_ok,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    """Text tile ``bt [BN, BD]`` x resident images ``at [BD, BM]``: ``p = exp2(s2 r - a2)`` (one FFMA + one MUFU
    per logit) is added to the image partials ``l2d [BN, BM]`` (reduced over texts once, after the loop) and summed
    over the images (the cheap direction of the tensor-core layout) into each text's base-2 LSE over the tile."""
    p = tl.exp2(_cosines(bt, at, txt_ok, img_ok, MASKED, PRECISION, ACC) * s2 - a2)
    l2d += p
    lc = tl.sum(p, 1)  # [BN]
    if MASKED:  # padded texts: no log2(0)
        lc = tl.where(txt_ok, lc, 1.0)
    lc = _log2(lc, FAST_LOG)  # relative to a2
    if _out_of_window(lc, txt_ok):  # rare: exact LSE with each text's max (the dot again: no live copy of r)
        r = _cosines(bt, at, txt_ok, img_ok, MASKED, PRECISION, ACC)
        cm = tl.max(r, 1) * s2
        if MASKED:
            cm = tl.where(txt_ok, cm, 0.0)
        lc = cm - a2 + _log2(tl.maximum(tl.sum(tl.exp2(r * s2 - cm[:, None]), 1), 1.0), FAST_LOG)  # own max: >= 1
    return l2d, a2 + lc


@triton.jit
def _rows_exact(
    at,
    txt_ptr,
    s2,
    img_ok,
    t0,
    t1,
    M,
    stride_t,
    d_ok,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    """Base-2 row LSEs over the text tiles ``[t0, t1)``, exactly (a max pass, then a sum pass): the rare fallback
    when a row sum of the anchored pass left the window."""
    offs_n = tl.arange(0, BLOCK_N)
    b_offs = _tile_offs(stride_t, BLOCK_N, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    for t in range(t0, t1):
        txt_ok = t * BLOCK_N + offs_n < M
        bt = _load(txt_ptr + tl.cast(t, tl.int64) * BLOCK_N * stride_t + b_offs, txt_ok, d_ok, True, EVEN_D, UPCAST)
        m = tl.maximum(m, tl.max(_cosines(bt, at, txt_ok, img_ok, True, PRECISION, ACC), 0))
    m = tl.where(img_ok, m, 0.0) * s2
    l = tl.zeros([BLOCK_M], ACC)
    for t in range(t0, t1):
        txt_ok = t * BLOCK_N + offs_n < M
        bt = _load(txt_ptr + tl.cast(t, tl.int64) * BLOCK_N * stride_t + b_offs, txt_ok, d_ok, True, EVEN_D, UPCAST)
        l += tl.sum(tl.exp2(_cosines(bt, at, txt_ok, img_ok, True, PRECISION, ACC) * s2 - m[None, :]), 0)
    return m + _log2(tl.where(img_ok, l, 1.0), FAST_LOG)


@triton.jit
def _fwd_kernel(
    img_ptr,
    txt_ptr,
    scale2_ptr,
    row_part_ptr,
    col_part_ptr,
    B,
    M,
    D,
    stride_i,
    stride_t,
    n_col_tiles,
    tiles_per_split,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    FAST_LOG: tl.constexpr,
    FIX_ROWS: tl.constexpr,
):
    """Program (group of ``GROUP`` row tiles, column split): base-2 row LSE over the split ->
    ``row_part[split, rows]``; base-2 column LSE over the group's rows of every visited column tile ->
    ``col_part[group, cols]`` (``GROUP`` = 256 / BLOCK_M keeps that buffer at ``4 B M / 256`` bytes when 256 rows
    do not fit shared memory, as for fp32; the group's row tiles run one after the other). The image tile
    stays resident as the dot's second operand: tiles are ``[texts, images]``, so the per-tile column LSEs reduce
    along the cheap (in-thread) axis and the row sums accumulate in registers, reduced once after the loop. Full
    tiles of a full row tile run without masks, the ragged ones after them. ``FIX_ROWS``: the second launch,
    which recomputes exactly the row LSEs of the first that left the anchor's window (a separate launch keeps the
    rare fallback's registers out of the main kernel)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    d_ok = tl.arange(0, BLOCK_D) < D
    s2 = tl.load(scale2_ptr)  # s * log2(e) > 0
    a2 = tl.maximum(s2 - _ANCHOR, 0.0)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_col_tiles)
    if FIX_ROWS:  # second launch, one program per row tile: rows whose anchored sum left the window (rare)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        part_ptrs = row_part_ptr + pid_s.to(tl.int64) * B + rows
        lr = tl.load(part_ptrs, mask=row_ok, other=0.0)
        if _out_of_window(lr - a2, row_ok):
            img_ptrs = img_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_i + _tile_offs(stride_i, BLOCK_M, BLOCK_D)
            at = tl.trans(_load(img_ptrs, row_ok, d_ok, True, EVEN_D, UPCAST))  # [BD, BM]
            lr = _rows_exact(
                at,
                txt_ptr,
                s2,
                row_ok,
                t0,
                t1,
                M,
                stride_t,
                d_ok,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                EVEN_D,
                UPCAST,
                PRECISION,
                ACC,
                FAST_LOG,
            )
            tl.store(part_ptrs, lr, mask=row_ok)
    else:  # one program per GROUP row tiles: they share one row of column partials
        first = pid_m * GROUP
        c_row = col_part_ptr + pid_m.to(tl.int64) * M
        r_row = row_part_ptr + pid_s.to(tl.int64) * B
        _fwd_row_tile(
            first,
            False,
            img_ptr,
            txt_ptr,
            r_row,
            c_row,
            s2,
            a2,
            t0,
            t1,
            B,
            M,
            stride_i,
            stride_t,
            d_ok,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            EVEN_D,
            UPCAST,
            PRECISION,
            ACC,
            FAST_LOG,
        )
        if GROUP > 1:  # the group's other row tiles log-add their column partials to the first one's
            for tm in range(first + 1, tl.minimum(first + GROUP, tl.cdiv(B, BLOCK_M))):
                _fwd_row_tile(
                    tm,
                    True,
                    img_ptr,
                    txt_ptr,
                    r_row,
                    c_row,
                    s2,
                    a2,
                    t0,
                    t1,
                    B,
                    M,
                    stride_i,
                    stride_t,
                    d_ok,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                    EVEN_D,
                    UPCAST,
                    PRECISION,
                    ACC,
                    FAST_LOG,
                )


@triton.jit
def _lse2_pair(x, y, FAST_LOG: tl.constexpr):
    """Base-2 ``log2(2^x + 2^y)`` (either may be ``-inf``)."""
    m = tl.maximum(x, y)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + _log2(tl.exp2(x - m) + tl.exp2(y - m), FAST_LOG)


@triton.jit
def _store_part(ptrs, cpart, ok, MERGE: tl.constexpr, MASKED: tl.constexpr, FAST_LOG: tl.constexpr):
    """Store a tile's column partials; ``MERGE``: log-add them to the ones the group's previous row tile left."""
    if MERGE:
        if MASKED:
            cpart = _lse2_pair(cpart, tl.load(ptrs, mask=ok, other=0.0), FAST_LOG)
        else:
            cpart = _lse2_pair(cpart, tl.load(ptrs), FAST_LOG)
    if MASKED:
        tl.store(ptrs, cpart, mask=ok)
    else:
        tl.store(ptrs, cpart)


@triton.jit
def _fwd_row_tile(
    tm,
    MERGE: tl.constexpr,
    img_ptr,
    txt_ptr,
    row_part,
    c_row,
    s2,
    a2,
    t0,
    t1,
    B,
    M,
    stride_i,
    stride_t,
    d_ok,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    """Row tile ``tm`` against the text tiles ``[t0, t1)``: row partials to ``row_part[rows]``, column partials to
    ``c_row[cols]`` (``MERGE``: log-added to what is there)."""
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < B
    if MERGE:
        tl.debug_barrier()  # the previous row tile's column partials were stored by other threads of this program
    img_ptrs = img_ptr + tl.cast(tm, tl.int64) * BLOCK_M * stride_i + _tile_offs(stride_i, BLOCK_M, BLOCK_D)
    at = tl.trans(_load(img_ptrs, row_ok, d_ok, True, EVEN_D, UPCAST))  # [BD, BM], resident
    l2d = tl.zeros([BLOCK_N, BLOCK_M], ACC)  # per-thread partial row sums
    t_fast = tl.where((tm + 1) * BLOCK_M <= B, tl.maximum(tl.minimum(t1, M // BLOCK_N), t0), t0)
    b_offs = _tile_offs(stride_t, BLOCK_N, BLOCK_D)
    b_base = txt_ptr + (t0 * BLOCK_N).to(tl.int64) * stride_t  # scalar pointers, moved once per tile
    c_base = c_row + t0 * BLOCK_N
    for _ in range(t0, t_fast):  # full tiles: no masks
        bt = _load(b_base + b_offs, offs_n, d_ok, False, EVEN_D, UPCAST)
        l2d, cpart = _fwd_tile(bt, at, l2d, s2, a2, offs_n >= 0, row_ok, False, PRECISION, ACC, FAST_LOG)
        _store_part(c_base + offs_n, cpart, offs_n >= 0, MERGE, False, FAST_LOG)
        b_base += BLOCK_N * stride_t
        c_base += BLOCK_N
    for t in range(t_fast, t1):  # ragged tiles (last column tile; every tile of a ragged row tile)
        txt_ok = t * BLOCK_N + offs_n < M
        bt = _load(b_base + b_offs, txt_ok, d_ok, True, EVEN_D, UPCAST)
        l2d, cpart = _fwd_tile(bt, at, l2d, s2, a2, txt_ok, row_ok, True, PRECISION, ACC, FAST_LOG)
        _store_part(c_base + offs_n, cpart, txt_ok, MERGE, True, FAST_LOG)
        b_base += BLOCK_N * stride_t
        c_base += BLOCK_N
    tl.store(row_part + rows, a2 + _log2(tl.where(row_ok, tl.sum(l2d, 0), 1.0), FAST_LOG), mask=row_ok)


@triton.jit
def _grad_tile(x, fixed, loop_lse, loop_w, roww, ROWS: tl.constexpr):
    """``Gx`` without the positive terms for one tile of base-2 logits ``x``, and ``P`` of the kernel's own
    direction (for ``dL/ds``). ``ROWS``: tile ``[rows, cols]`` (row LSEs ``fixed [rows]``, column LSEs / weights
    ``loop_* [cols]``); else ``[cols, rows]`` (column LSE ``fixed``, row LSEs ``loop_lse``)."""
    if ROWS:
        p_row = tl.exp2(x - fixed[:, None])
        p_col = tl.exp2(x - loop_lse[None, :])
        return roww * p_row + loop_w[None, :] * p_col, p_row
    else:
        p_row = tl.exp2(x - loop_lse[None, :])
        p_col = tl.exp2(x - fixed[:, None])
        return roww * p_row + loop_w[:, None] * p_col, p_col


@triton.jit
def _loop_part(PART: tl.constexpr, p0, p1, n_full, n_tiles):
    """Tiles ``[lo, hi)`` of part ``PART`` of a backward loop: 0 the full tiles before the ones that hold positives
    (``[p0, p1)``), 1 those (masked, positives; ``SLOW``), 2 the full tiles after them, 3 the ragged last tile
    (masked)."""
    p1 = tl.maximum(p1, p0)
    lo = p0 * 0
    hi = tl.minimum(p0, n_full)
    if PART == 1:
        lo, hi = p0, p1
    if PART == 2:
        lo, hi = p1, n_full
    if PART == 3:
        lo, hi = tl.maximum(p1, n_full), n_tiles
    return lo, hi


@triton.jit
def _rows_loop(
    a,
    acc,
    rs,
    r2,
    rows,
    roww,
    s2,
    txt_ptr,
    c2_ptr,
    colw_ptr,
    t_start,
    t_end,
    M,
    stride_t,
    col0,
    K,
    d_ok,
    SLOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Column tiles ``[t_start, t_end)`` of the row-block backward; ``SLOW``: masked loads and the positive
    pairs (only the tiles holding them, and the ragged last tile, take this path)."""
    offs_n = tl.arange(0, BLOCK_N)
    b_offs = _tile_offs(stride_t, BLOCK_N, BLOCK_D)
    b_base = txt_ptr + tl.cast(t_start, tl.int64) * BLOCK_N * stride_t
    for t in range(t_start, t_end):
        cols = t * BLOCK_N + offs_n
        bt = _load(b_base + b_offs, cols < M, d_ok, SLOW, EVEN_D, UPCAST)  # [BN, BD]
        if SLOW:
            c2 = tl.load(c2_ptr + cols, mask=cols < M, other=0.0)
            cw = tl.load(colw_ptr + cols, mask=cols < M, other=0.0)
        else:
            c2 = tl.load(c2_ptr + cols)
            cw = tl.load(colw_ptr + cols)
        r = tl.dot(a, tl.trans(bt), input_precision=PRECISION, out_dtype=ACC)  # [BM, BN] cosines
        gx, p = _grad_tile(r * s2, r2, c2, cw, roww, True)
        if SLOW:  # positives: local row i, columns col0 + i*K ... + K - 1
            jj = (cols - col0)[None, :]
            first = (rows * K)[:, None]
            pos = ((jj >= first) & (jj < first + K)).to(ACC)
            gx -= pos * (roww / K + cw[None, :])
            p -= pos / K
            ok = (cols < M)[None, :]  # padded columns: x = 0 gives P_row = 2^-r2, inf when r2 < -128
            gx = tl.where(ok, gx, 0.0)
            p = tl.where(ok, p, 0.0)
        rs += tl.sum(p * r, 1)
        acc = tl.dot(gx.to(bt.dtype), bt, acc, input_precision=PRECISION, out_dtype=ACC)
        b_base += BLOCK_N * stride_t
    return acc, rs


@triton.jit
def _bwd_rows_kernel(
    img_ptr,
    txt_ptr,
    scale2_ptr,
    r2_ptr,
    c2_ptr,
    roww_ptr,
    colw_ptr,
    out_scale_ptr,
    di_ptr,
    rowsum_ptr,
    B,
    M,
    D,
    stride_i,
    stride_t,
    col0,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program per row tile, loop over all column tiles:
    ``dI = out_scale * Gx T`` [BM, D] in di's dtype and ``rowsum_i = sum_j (P_row - t_row)_ij R_ij``, where
    ``Gx = roww (P_row - t/K) + colw_j (P_col - t)`` and ``t`` marks the positives (local row i, column
    ``col0 + i*K + k``). No logit masks: a padded row or column has zero features and adds nothing."""
    pid = tl.program_id(0)
    r0 = pid * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    d_ok = tl.arange(0, BLOCK_D) < D
    row_ok = rows < B
    a = _load(
        img_ptr + r0.to(tl.int64) * stride_i + _tile_offs(stride_i, BLOCK_M, BLOCK_D),
        row_ok,
        d_ok,
        True,
        EVEN_D,
        UPCAST,
    )
    s2 = tl.load(scale2_ptr)
    roww = tl.load(roww_ptr)
    r2 = tl.load(r2_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    rs = tl.zeros([BLOCK_M], ACC)
    n_tiles, n_full = tl.cdiv(M, BLOCK_N), M // BLOCK_N
    p0 = (col0 + r0 * K) // BLOCK_N  # column tiles [p0, p1) hold this row tile's positives
    p1 = (col0 + tl.minimum(r0 + BLOCK_M, B) * K - 1) // BLOCK_N + 1
    # column tiles: full ones before the positives, the positive ones, full ones after, the ragged last one
    for part in tl.static_range(4):
        lo, hi = _loop_part(part, p0, p1, n_full, n_tiles)
        acc, rs = _rows_loop(
            a, acc, rs, r2, rows, roww, s2, txt_ptr, c2_ptr, colw_ptr, lo, hi, M, stride_t, col0, K, d_ok,
            part % 2 == 1, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, PRECISION, ACC,
        )  # fmt: skip
    acc = acc * tl.load(out_scale_ptr)
    tl.store(
        di_ptr + r0.to(tl.int64) * D + _tile_offs(D, BLOCK_M, BLOCK_D),
        acc.to(di_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(rowsum_ptr + rows, rs, mask=row_ok)


@triton.jit
def _cols_loop(
    bt,
    acc,
    cs,
    c2,
    cw,
    cols,
    roww,
    s2,
    img_ptr,
    r2_ptr,
    t_start,
    t_end,
    B,
    stride_i,
    col0,
    K,
    d_ok,
    SLOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Row tiles ``[t_start, t_end)`` of the column-block backward (tiles held transposed, ``[BN, BM]``)."""
    offs_m = tl.arange(0, BLOCK_M)
    a_offs = _tile_offs(stride_i, BLOCK_M, BLOCK_D)
    a_base = img_ptr + tl.cast(t_start, tl.int64) * BLOCK_M * stride_i
    for t in range(t_start, t_end):
        rows = t * BLOCK_M + offs_m
        a = _load(a_base + a_offs, rows < B, d_ok, SLOW, EVEN_D, UPCAST)  # [BM, BD]
        if SLOW:
            r2 = tl.load(r2_ptr + rows, mask=rows < B, other=0.0)
        else:
            r2 = tl.load(r2_ptr + rows)
        rt = tl.dot(bt, tl.trans(a), input_precision=PRECISION, out_dtype=ACC)  # [BN, BM] = R^T
        gx, p = _grad_tile(rt * s2, c2, r2, cw, roww, False)
        if SLOW:
            jj = (cols - col0)[:, None]
            first = (rows * K)[None, :]
            pos = ((jj >= first) & (jj < first + K) & (rows < B)[None, :]).to(ACC)
            gx -= pos * (roww / K + cw[:, None])
            p -= pos
            ok = (rows < B)[None, :]  # padded rows: x = 0 gives P_col = 2^-c2, inf when c2 < -128
            gx = tl.where(ok, gx, 0.0)
            p = tl.where(ok, p, 0.0)
        cs += tl.sum(p * rt, 1)
        acc = tl.dot(gx.to(a.dtype), a, acc, input_precision=PRECISION, out_dtype=ACC)
        a_base += BLOCK_M * stride_i
    return acc, cs


@triton.jit
def _bwd_cols_kernel(
    img_ptr,
    txt_ptr,
    scale2_ptr,
    r2_ptr,
    c2_ptr,
    roww_ptr,
    colw_ptr,
    out_scale_ptr,
    dt_ptr,
    colsum_ptr,
    B,
    M,
    D,
    stride_i,
    stride_t,
    col0,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program per column tile, loop over all row tiles: ``dT = out_scale * Gx^T I`` [BN, D] in dt's dtype and
    ``colsum_j = sum_i (P_col - t)_ij R_ij``."""
    pid = tl.program_id(0)
    c0 = pid * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D) < D
    col_ok = cols < M
    bt = _load(
        txt_ptr + c0.to(tl.int64) * stride_t + _tile_offs(stride_t, BLOCK_N, BLOCK_D),
        col_ok,
        d_ok,
        True,
        EVEN_D,
        UPCAST,
    )
    s2 = tl.load(scale2_ptr)
    roww = tl.load(roww_ptr)
    c2 = tl.load(c2_ptr + cols, mask=col_ok, other=0.0)
    cw = tl.load(colw_ptr + cols, mask=col_ok, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    cs = tl.zeros([BLOCK_N], ACC)
    n_tiles, n_full = tl.cdiv(B, BLOCK_M), B // BLOCK_M
    # rows whose positives fall in columns [c0, c0 + BN): i in [(j_lo - col0) // K, (j_hi - 1 - col0) // K]
    j_lo = tl.maximum(c0, col0)
    j_hi = tl.minimum(tl.minimum(c0 + BLOCK_N, M), col0 + B * K)
    has = j_hi > j_lo
    p0 = tl.where(has, ((j_lo - col0) // K) // BLOCK_M, 0)
    p1 = tl.where(has, ((tl.maximum(j_hi, j_lo + 1) - 1 - col0) // K) // BLOCK_M + 1, 0)
    # row tiles: full ones before the positives, the positive ones, full ones after, the ragged last one
    for part in tl.static_range(4):
        lo, hi = _loop_part(part, p0, p1, n_full, n_tiles)
        acc, cs = _cols_loop(
            bt, acc, cs, c2, cw, cols, roww, s2, img_ptr, r2_ptr, lo, hi, B, stride_i, col0, K, d_ok,
            part % 2 == 1, BLOCK_M, BLOCK_D, EVEN_D, UPCAST, PRECISION, ACC,
        )  # fmt: skip
    acc = acc * tl.load(out_scale_ptr)
    tl.store(
        dt_ptr + c0.to(tl.int64) * D + _tile_offs(D, BLOCK_N, BLOCK_D),
        acc.to(dt_ptr.dtype.element_ty),
        mask=col_ok[:, None] & d_ok[None, :],
    )
    tl.store(colsum_ptr + cols, cs, mask=col_ok)


# Tiles and autotune configs. Every config listed here was compiled for sm_90a and sm_80 at D = 256 by
# ``python -m bench.kernel_report`` (bench/results/kernel_report.md): spill-free, within shared memory, dots on tensor
# cores; tests/test_kernel_report.py gates a subset in CI. Shared memory is dominated by the resident whole-D operand
# tile plus one tile per pipeline stage; _fits() prunes by that estimate against the device's per-block limit.
_SMEM_SLACK = 8 * 1024  # reduction scratch and barriers beside the operand tiles
_FIX_WARPS = 8  # the forward's second launch (FIX_ROWS): not autotuned, it is rare work
# backward (BLOCK_M, BLOCK_N, num_warps, num_stages) by (Hopper or later, element size); fp32 runs as tf32
_BWD_ROWS = {
    (True, 2): ((128, 32, 8, 2), (128, 32, 8, 3)),
    (False, 2): ((64, 32, 8, 2),),
    (True, 4): ((32, 32, 4, 1),),  # (32, 32, 8, 1) spilled 12 B (K = 3) once the ragged tiles were masked
    (False, 4): ((32, 32, 4, 1),),
}
_BWD_COLS = {
    (True, 2): ((32, 128, 8, 2), (32, 128, 8, 3)),
    (False, 2): ((32, 64, 8, 2),),
    (True, 4): ((32, 32, 4, 1),),
    (False, 4): ((32, 32, 4, 1),),
}  # (32, 32, 8, 1) spilled 8 B (K = 1)


def _smem_limit(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"]


def _fits(resident: int, moving: int, stages: int, block_d: int, elsize: int, smem: int) -> bool:
    return (resident + moving * max(stages, 1)) * block_d * elsize + _SMEM_SLACK <= smem


def _fwd_tiles(block_d: int, elsize: int, smem: int) -> tuple[int, int]:
    """Forward ``(BLOCK_M, BLOCK_N)``: the largest resident image tile (<= 256 rows), then the largest text tile,
    that fit ``smem``. 16-bit at D = 256: 256 x 64 on sm_90, 256 x 32 on sm_80 (163 KB). fp32 (4 bytes) takes at
    most 64 rows, grouped by :func:`_fwd_group`: 128-row fp32 tiles do not group without spilling (236 B on
    sm_90a), and ungrouped their partials were 101 MB at B = 32768, K = 3."""
    for bm in (256, 128, 64, 32, 16) if elsize == 2 else (64, 32, 16):
        for bn in (64, 32) if elsize <= 4 else (32, 16):
            if _fits(bm, bn, 1, block_d, elsize, smem):
                return bm, bn
    return 16, 16


def _fwd_group(block_m: int) -> int:
    """Row tiles per forward program (``GROUP``): 256 rows share one row of column partials (``4 B M / 256`` bytes:
    50 MB at B = 32768, K = 3) when the tiles have at most 64 rows; larger tiles stay ungrouped (a grouped
    128-row kernel spilled)."""
    return 256 // block_m if block_m <= 64 else 1


def _fwd_configs(block_d: int, elsize: int, smem: int) -> list[tuple[int, int]]:
    """Forward ``(num_warps, num_stages)`` candidates for the tiles of :func:`_fwd_tiles`: 8 warps (fp32 64 x 64 at
    4 warps spilled), fp32 at 2 stages where they fit (1 stage spilled 156 B on sm_90a)."""
    bm, bn = _fwd_tiles(block_d, elsize, smem)
    warps = 8 if bm >= 128 or elsize == 4 else 4
    stages = [st for st in (1, 2) if st == 1 or _fits(bm, bn, st, block_d, elsize, smem)]
    return [(warps, st) for st in (stages[-1:] if elsize == 4 else stages)]


def _bwd_configs(
    rows: bool, block_d: int, elsize: int, smem: int, hopper: bool = True
) -> list[tuple[int, int, int, int]]:
    """Backward ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` that fit ``smem`` (the smallest if none does)."""
    table = (_BWD_ROWS if rows else _BWD_COLS)[(hopper, elsize)]
    fits = [
        c
        for c in table
        if _fits(
            c[0] if rows else c[1], c[1] if rows else c[0], c[3], block_d, elsize * (1 if elsize == 2 else 2), smem
        )
    ]  # tf32 / fp64: a transposed copy
    return fits or [min(table, key=lambda c: c[0] * c[1])]


def _prune_bwd(configs, named_args, **kwargs):
    elsize, rows = named_args["img_ptr"].element_size(), "di_ptr" in named_args
    dev = named_args["img_ptr"].device
    hopper = torch.cuda.get_device_capability(dev)[0] >= 9
    keep = set(_bwd_configs(rows, kwargs["BLOCK_D"], elsize, _smem_limit(dev), hopper))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]


def _prune_fwd(configs, named_args, **kwargs):
    elsize = named_args["img_ptr"].element_size()
    keep = set(_fwd_configs(kwargs["BLOCK_D"], elsize, _smem_limit(named_args["img_ptr"].device)))
    return [c for c in configs if (c.num_warps, c.num_stages) in keep]


def _configs(table: dict[tuple[bool, int], tuple]) -> list:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in sorted({c for cs in table.values() for c in cs})
    ]


if INTERPRET:  # autotune with >= 2 configs cannot run under the interpreter
    _fwd_launch, _rows_launch, _cols_launch = _fwd_kernel, _bwd_rows_kernel, _bwd_cols_kernel
else:
    _fwd_launch = triton.autotune(  # tiles fixed by _fwd_tiles (the partial buffers depend on them)
        configs=[triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (1, 2)],
        key=["B", "M", "D"],
        prune_configs_by={"early_config_prune": _prune_fwd},
    )(_fwd_kernel)
    _rows_launch = triton.autotune(
        configs=_configs(_BWD_ROWS), key=["B", "M", "D"], prune_configs_by={"early_config_prune": _prune_bwd}
    )(_bwd_rows_kernel)
    _cols_launch = triton.autotune(
        configs=_configs(_BWD_COLS), key=["B", "M", "D"], prune_configs_by={"early_config_prune": _prune_bwd}
    )(_bwd_cols_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops so that torch.compile treats them as opaque calls
# ----------------------------------------------------------------------------------------------------------------


def _kernel_consts(x: Tensor) -> dict:
    """Constexprs shared by the three kernels. fp32 dots run on tensor cores as ``tf32`` (10-bit mantissa
    operands, fp32 accumulation) whatever ``torch.get_float32_matmul_precision()`` says: the report showed
    ``ieee`` lowering to FMA and ``tf32x3`` spilling 7-90 KB in every config; use the eager backend for an fp32-exact
    loss. fp64 (interpreter only, for gradcheck): exact. The interpreter computes every dot exactly."""
    cd = compute_dtype(x.dtype)
    precision = "tf32" if x.dtype == torch.float32 else "ieee"  # ignored for fp16/bf16; fp64 must be ieee
    block_d = max(16, triton.next_power_of_2(x.shape[1]))
    return dict(
        BLOCK_D=block_d,
        EVEN_D=x.shape[1] == block_d,
        UPCAST=INTERPRET and x.dtype == torch.bfloat16,
        PRECISION=precision,
        ACC=tl.float64 if cd == torch.float64 else tl.float32,
    )


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
    return torch.cat(
        [
            (image[a : a + chunk].to(cd).unsqueeze(1) * text[a * k : (a + chunk) * k].to(cd).view(-1, k, d)).sum(-1)
            for a in range(0, b, chunk)
        ]
    )


@torch.library.custom_op("groupvit_kernels::contrastive_lse", mutates_args=())
def _lse_op(image: Tensor, text: Tensor, scale2: Tensor, check_finite: bool) -> tuple[Tensor, Tensor]:
    """Base-2 row LSE ``[B]`` and (this rank's partial) column LSE ``[M]`` of ``X = s I T^T``; ``scale2 = s log2 e``."""
    if check_finite:
        _raise_if_nonfinite(image, text, scale2)
    b, d = image.shape
    m = text.shape[0]
    cd = compute_dtype(image.dtype)
    consts = _kernel_consts(image)
    if INTERPRET:
        bm = bn = _INTERP_BLOCK
    else:
        bm, bn = _fwd_tiles(consts["BLOCK_D"], image.element_size(), _smem_limit(image.device))
    n_row, n_col = triton.cdiv(b, bm), triton.cdiv(m, bn)
    group = _fwd_group(bm)
    n_group = triton.cdiv(n_row, group)
    if INTERPRET:
        want = 2  # exercise the cross-split merge in CI while keeping few programs
    else:
        index = image.device.index if image.device.index is not None else torch.cuda.current_device()
        want = max(1, triton.cdiv(4 * _num_sms(index), n_group))  # ~4 programs per SM
    per_split = triton.cdiv(n_col, min(n_col, want))
    n_split = triton.cdiv(n_col, per_split)
    row_part = torch.empty(n_split, b, device=image.device, dtype=cd)  # [S, B]
    col_part = torch.empty(n_group, m, device=image.device, dtype=cd)  # [B/(GROUP*BM), M]
    args = (image, text, scale2, row_part, col_part, b, m, d, image.stride(0), text.stride(0), n_col, per_split, group)
    consts.update(BLOCK_M=bm, BLOCK_N=bn, FAST_LOG=not INTERPRET and cd == torch.float32)
    _fwd_launch[(n_group, n_split)](*args, FIX_ROWS=False, **consts)
    _fwd_kernel[(n_row, n_split)](*args, FIX_ROWS=True, num_warps=_FIX_WARPS, **consts)  # usually exits at once
    return _lse2(row_part), _lse2(col_part)


@_lse_op.register_fake
def _(image: Tensor, text: Tensor, scale2: Tensor, check_finite: bool) -> tuple[Tensor, Tensor]:
    cd = compute_dtype(image.dtype)
    return image.new_empty(image.shape[0], dtype=cd), image.new_empty(text.shape[0], dtype=cd)


@torch.library.custom_op("groupvit_kernels::contrastive_grads", mutates_args=())
def _grads_op(
    image: Tensor,
    text: Tensor,
    scale2: Tensor,
    r2: Tensor,
    c2: Tensor,
    roww: Tensor,
    colw: Tensor,
    di_scale: Tensor,
    dt_scale: Tensor,
    col0: int,
    k: int,
    dt_full: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dI [B,D]``, ``dT [M,D]``, ``rowsum [B]``, ``colsum [M]`` with ``Gx = roww (P_row - t/K) + colw_j (P_col - t)``
    (positives ``t`` at local row i, column ``col0 + i*K + k``); ``dI``/``dT`` are scaled by ``di_scale``/``dt_scale``
    and come in the input dtype, except ``dT`` in the compute dtype when ``dt_full`` (to be summed over ranks)."""
    b, d = image.shape
    m = text.shape[0]
    cd = compute_dtype(image.dtype)
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
def _(
    image: Tensor,
    text: Tensor,
    scale2: Tensor,
    r2: Tensor,
    c2: Tensor,
    roww: Tensor,
    colw: Tensor,
    di_scale: Tensor,
    dt_scale: Tensor,
    col0: int,
    k: int,
    dt_full: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cd = compute_dtype(image.dtype)
    b, m, d = image.shape[0], text.shape[0], image.shape[1]
    return (
        image.new_empty(b, d),
        image.new_empty(m, d, dtype=cd if dt_full else image.dtype),
        image.new_empty(b, dtype=cd),
        image.new_empty(m, dtype=cd),
    )


def _raise_if_nonfinite(image: Tensor, text: Tensor, scale: Tensor) -> None:
    ok = torch.isfinite(image).all() & torch.isfinite(text).all() & torch.isfinite(scale).all()
    if not bool(ok):
        bad = [n for n, t in (("image", image), ("text", text), ("logit scale", scale)) if not torch.isfinite(t).all()]
        raise ValueError(
            f"contrastive_loss: non-finite values (NaN/Inf) in {', '.join(bad)} "
            f"(image {tuple(image.shape)}, text {tuple(text.shape)}); on other ranks if none listed"
        )


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
    def forward(
        ctx, image: Tensor, text: Tensor, scale: Tensor, k: int, group, world: int, rank: int, check: bool
    ) -> Tensor:  # type: ignore[override]
        b, d = image.shape
        cd = scale.dtype
        scale2 = scale * LOG2E  # [1]
        if world > 1:
            if check:  # every rank raises together instead of leaving the others hanging in a collective
                flag = torch.stack([torch.isfinite(t).all() for t in (image, text, scale)]).all().to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
                if not bool(flag):
                    _raise_if_nonfinite(image, text, scale)
                    raise ValueError(
                        f"contrastive_loss: non-finite values (NaN/Inf) on another rank "
                        f"(local image {tuple(image.shape)}, text {tuple(text.shape)})"
                    )
            txt_all = _all_gather(text, group, world)  # [W*B*K, D]
            r2, c2p = torch.ops.groupvit_kernels.contrastive_lse(image, txt_all, scale2, False)
            c2 = _lse2(_all_gather(c2p, group, world).view(world, -1))  # [W*B*K] global column LSEs
        else:
            txt_all = text
            r2, c2 = torch.ops.groupvit_kernels.contrastive_lse(image, txt_all, scale2, check)
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
        d_image, dt, rowsum, colsum = torch.ops.groupvit_kernels.contrastive_grads(
            image,
            txt_all,
            scale * LOG2E,
            r2,
            c2,
            roww / norm,
            colw / norm,
            out_scale,
            torch.ones_like(out_scale) if world > 1 else out_scale,
            rank * b * k,
            k,
            world > 1,
        )
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


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, *, num_prompts: int = 1, group=None) -> Tensor:
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
    if dt not in DTYPES:
        raise TypeError(f"contrastive_loss (triton): unsupported dtype {dt}; use one of {DTYPES}")
    if not triton_can_launch(image.device, INTERPRET):
        raise ValueError(
            f"contrastive_loss (triton): got {image.device} tensors (image {tuple(image.shape)}, text "
            f"{tuple(text.shape)}); the Triton kernels need a GPU: use CUDA tensors or select the eager "
            f"backend (or set TRITON_INTERPRET=1 before importing the kernels)"
        )
    if dt == torch.float64 and image.device.type == "cuda":
        raise ValueError(
            f"contrastive_loss (triton): fp64 features (image {tuple(image.shape)}) run under the Triton "
            f"interpreter only (gradcheck); on the GPU use fp32/bf16/fp16 or select the eager backend"
        )
    if image.shape[1] > MAX_D:
        raise ValueError(
            f"contrastive_loss (triton): embedding dim {image.shape[1]} > {MAX_D} is not supported "
            f"(image {tuple(image.shape)}); select the eager backend"
        )
    cd = compute_dtype(dt)
    world = dist.get_world_size(group) if (dist.is_available() and dist.is_initialized()) else 1
    rank = dist.get_rank(group) if world > 1 else 0
    scale = reference.clamped_scale(logit_scale.to(device=image.device, dtype=cd)).reshape(1)  # [1], autograd
    return _ContrastiveLoss.apply(
        image.to(dt).contiguous(), text.to(dt).contiguous(), scale, num_prompts, group, world, rank, _check_finite
    )


# ----------------------------------------------------------------------------------------------------------------
# Every config the launchers and autotuners above can pick (compiled-code report: kernels/variants.py)
# ----------------------------------------------------------------------------------------------------------------


def variants(shape: dict[str, int], dtype: torch.dtype, num_sms: int = 132, smem: int = 227 * 1024) -> list:
    """One :class:`kernels.variants.Variant` per config the launchers and autotuners can pick at ``shape``
    (registry dims ``B, D, K``) and input ``dtype`` (fp32: both matmul precisions) on a GPU with ``num_sms`` SMs and
    ``smem`` bytes of shared memory per block. Keep in sync with the launchers."""
    from kernels.variants import Variant

    b, d, k = shape["B"], shape["D"], shape.get("K", 1)
    m = b * k
    es = torch.empty((), dtype=dtype).element_size()
    block_d = max(16, triton.next_power_of_2(d))
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    out = []
    if dtype == torch.float64:  # refused on the GPU (interpreter-only gradcheck path)
        return []
    hopper = smem > 200 * 1024  # sm_90 (227 KB per block) vs sm_80 (163 KB)
    for prec in ("tf32",) if dtype == torch.float32 else ("ieee",):
        label = f"{name}-{prec}" if dtype == torch.float32 else name
        fl = {"bf16": "bf16", "fp16": "fp16", "fp64": "fp64"}.get(name, "tf32")
        consts = dict(BLOCK_D=block_d, EVEN_D=d == block_d, UPCAST=False, PRECISION=prec, ACC=acc)
        case = dict(
            op="contrastive_loss",
            case=f"B{b}-D{d}-K{k}",
            dtype=label,
            floor_dtype=fl,
            hot_loop=0,
            meta=dict(mode=f"K={k}"),
        )
        # forward: tiles fixed by _fwd_tiles, autotuned warps x stages; grid as in _lse_op
        bm, bn = _fwd_tiles(block_d, es, smem)
        n_row, n_col = triton.cdiv(b, bm), triton.cdiv(m, bn)
        group = _fwd_group(bm)
        n_group = triton.cdiv(n_row, group)
        per_split = triton.cdiv(n_col, min(n_col, max(1, triton.cdiv(4 * num_sms, n_group))))
        n_split = triton.cdiv(n_col, per_split)
        fwd_runs = [("fwd", w, st, False) for w, st in _fwd_configs(block_d, es, smem)]
        for kname, w, st, fix in fwd_runs + [("fwd_fix", _FIX_WARPS, 1, True)]:  # fwd_fix: rows-only fallback
            out.append(
                Variant(
                    kernel=kname,
                    fn=_fwd_kernel,
                    num_warps=w,
                    num_stages=st,
                    grid=(n_row if fix else n_group, n_split),
                    args=dict(
                        img_ptr=dtype,
                        txt_ptr=dtype,
                        scale2_ptr=torch.float32,
                        row_part_ptr=torch.float32,
                        col_part_ptr=torch.float32,
                        B=b,
                        M=m,
                        D=d,
                        stride_i=d,
                        stride_t=d,
                        n_col_tiles=n_col,
                        tiles_per_split=per_split,
                        GROUP=group,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        FAST_LOG=acc == tl.float32,
                        FIX_ROWS=fix,
                        **consts,
                    ),
                    flops=0.0 if fix else 2.0 * b * m * d,
                    bytes=4.0 * n_split * b if fix else (b + m) * d * es + 4.0 * (n_split * b + group * n_group * m),
                    logits_per_iter=0 if fix else bm * bn,
                    config=f"BM={bm} BN={bn} w{w} s{st}",
                    **case,
                )
            )
        # backward: the autotuned configs that survive _prune_bwd
        for kname, fn in (("bwd_rows", _bwd_rows_kernel), ("bwd_cols", _bwd_cols_kernel)):
            rows = kname == "bwd_rows"
            for bm, bn, w, st in _bwd_configs(rows, block_d, es, smem, hopper):
                ptrs = dict(img_ptr=dtype, txt_ptr=dtype, di_ptr=dtype, dt_ptr=dtype)
                args = {p.name: ptrs.get(p.name, torch.float32) for p in fn.params if p.name.endswith("_ptr")}
                out.append(
                    Variant(
                        kernel=kname,
                        fn=fn,
                        num_warps=w,
                        num_stages=st,
                        grid=(triton.cdiv(b, bm) if rows else triton.cdiv(m, bn),),
                        args=dict(
                            args, B=b, M=m, D=d, stride_i=d, stride_t=d, col0=0, K=k, BLOCK_M=bm, BLOCK_N=bn, **consts
                        ),
                        flops=4.0 * b * m * d,
                        bytes=((2 * b + m) if rows else (b + 2 * m)) * d * es,
                        logits_per_iter=bm * bn,
                        config=f"BM={bm} BN={bn} w{w} s{st}",
                        **case,
                    )
                )
    return out
