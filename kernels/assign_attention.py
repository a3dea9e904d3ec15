"""Fused GroupViT assignment attention (docs/kernels.md §1-2), spec: :func:`kernels.reference.assign_attention`.

``q [B,G,C]`` group tokens, ``k, v [B,N,C]`` image tokens. Per image and token ``n`` the logits
``x_gn = scale * q_g . k_n (+ Gumbel_gn)`` are soft-maxed over the *group* axis ``g`` (temperature ``tau``);
hard mode takes the one-hot argmax (ties -> lowest ``g``) with the straight-through softmax gradient. The output is
``O = (A @ V) / (sum_n A + eps)``.

Layout of this file: ``@triton.jit`` kernels -> launchers (validate, allocate on ``q.device``, grid, launch) ->
autograd (``torch.library.custom_op`` s: the seed draw, forward and backward, the last two tied by
``register_autograd``; each one opaque node to ``torch.compile``, so the public op traces as one graph, no break)
-> public :func:`assign_attention`.

Design (sm_90a compiled-code figures: ``python -m bench.kernel_report``, README "Kernels"):

* Grid ``(token splits, B)``: a program owns one image, all ``G`` groups (padded to a power of two >= 8 with
  ``-inf`` logits) and all ``C`` channels as ``NC <= 4`` unrolled chunks of ``BLOCK_C``; it walks its tokens in
  ``BLOCK_N`` tiles (k / v tiles software-pipelined by Triton, q resident). Logits, noise, softmax and argmax are
  computed **once per logit**, forward and backward. Tiles are transposed (``[tokens, groups]``, accumulators
  ``[channels, groups]``) so the group softmax is a row reduction and G = 8 (stage 2) fills an MMA's N = 8 instead
  of a 16-row M tile. Tokens are split across programs only when B programs would leave SMs idle (448-px crops);
  the launcher then reduces fp32 partial sums in a fixed order, so results stay bitwise deterministic (no atomics).
* Nothing of size ``G x N`` is stored. The forward saves ``out`` and ``d [B,G]`` (group sizes, fp32); the backward
  recomputes logits, noise, softmax and argmax per tile and uses ``Delta_g = dO_g . O_g`` (docs/kernels.md §1.2).
* Where the backward's resident q / dO (or its dq accumulators next to mma.sync's register operands) do not fit
  (fp32 at stage 1; 16-bit at G = 64 on sm_80), the launcher picks the *streamed* backward instead: grid
  ``(channel chunks, B)``, each program owning one chunk of dq / dk / dv and recomputing the tile's logits over all
  channels, q / dO chunks re-read from L2 (docs/kernels.md §1.3).
* Gumbel noise: one Philox-4x32-10 call (``tl.randint4x``) per 4 groups, all four words used; element
  ``(b, g, n)`` is word ``g % 4`` of counter ``offset + (b * ceil(G/4) + g // 4) * N + n`` (logical indices, not
  tiles: independent of block sizes and grid). Word -> ``u = (2 (w >> 9) + 1) 2^-24`` (exact, never 0 or 1: no
  clamp) -> ``-log(-log u)`` with an accurate inner log and ``log2`` (``lg2.approx``, ~1e-7 absolute) outside.
  :func:`gumbel_noise` materialises the very same stream for the eager reference.
* A NaN logit makes its token's assignment NaN in every group (hard mode too), as in the reference.
* Precision: compute dtype fp32 (fp64 for fp64 inputs, exact "ieee" dots, so ``gradcheck`` works). fp16/bf16 feed
  the tensor cores natively; fp32 runs on them too, at ``tf32`` whatever ``torch.get_float32_matmul_precision()``
  says (see :func:`_types`); never FMA. Under the interpreter bf16 is upcast right after every load (its bf16 dot
  is broken) and every dot is exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice
from triton.runtime.errors import OutOfResources

from kernels.registry import OPS
from kernels.utils import DTYPE_NAMES, INTERPRET, compute_dtype, triton_can_launch
from kernels.variants import Variant

__all__ = ["assign_attention", "draw_seed", "gumbel_noise", "philox_bits", "MAX_GROUPS"]

# Captured once: the @triton.jit decorators below were built in this mode (interpreted or compiled).

MAX_GROUPS = 256  # all G rows live in one program
FAST_LOG = tl.constexpr(not INTERPRET)  # lg2.approx for the outer log of the noise (libdevice: GPU only)
# The kernels' NOISE constexpr, where the Gumbel noise comes from: none (eval, or gumbel=False), in-kernel Philox,
# or an explicit noise tensor [B, G, N]. _PHILOX / _TENSOR: the same values, readable inside @triton.jit code.
NOISE_OFF, NOISE_PHILOX, NOISE_TENSOR = 0, 1, 2
_PHILOX, _TENSOR = tl.constexpr(NOISE_PHILOX), tl.constexpr(NOISE_TENSOR)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _uniform_to_gumbel(r):
    """Gumbel(0,1) in fp32 from one uint32 Philox word: ``u = (2 (r >> 9) + 1) 2^-24``, exact and inside (0, 1)
    (never 0 or 1, so no clamp), then ``-log(-log u)``. The inner log is the accurate one (it sets the upper tail,
    where ``-log u`` is tiny); the outer one is ``lg2.approx`` on the GPU (``fast_log2f``, one MUFU instruction,
    about 1e-7 absolute error in the noise), exact ``log2`` under the interpreter (no libdevice there)."""
    f = ((r >> 9) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + k 2^-23 in [1, 2)
    u = f - 0.99999994039535522  # 1 - 2^-24: (2k + 1) 2^-24, exact
    e = -tl.log(u)  # Exp(1), > 0
    if FAST_LOG:
        return -0.6931471805599453 * libdevice.fast_log2f(e)
    else:
        return -0.6931471805599453 * tl.math.log2(e)


@triton.jit
def _ctr_base(offset, b, G, N, CTR64: tl.constexpr):
    """Philox counter of element ``(b, g=0, n=0)``: ``offset + b * ceil(G/4) * N`` (int64 only where it may need it)."""
    if CTR64:
        return offset.to(tl.int64) + b.to(tl.int64) * ((G + 3) // 4) * N
    else:
        return offset + b * ((G + 3) // 4) * N


@triton.jit
def _noise_tile(seed, ctr_base, g0, offs_n, N, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Gumbel noise ``[BLOCK_N, BLOCK_G]`` (tokens x groups ``g0 ..``, g0 a multiple of 4), one Philox-4x32 call per
    4 groups: element ``(g, n)`` is word ``g % 4`` of counter ``ctr_base + (g // 4) * N + n``."""
    g4 = g0 // 4 + tl.arange(0, BLOCK_G // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, ctr_base + g4[None, :] * N + offs_n[:, None])  # [BN, BG/4] each
    z = tl.join(
        tl.join(_uniform_to_gumbel(r0), _uniform_to_gumbel(r2)), tl.join(_uniform_to_gumbel(r1), _uniform_to_gumbel(r3))
    )  # [BN, BG/4, 2, 2]: [.., i, j] = word 2i+j
    return tl.reshape(z, (BLOCK_N, BLOCK_G))


@triton.jit
def _chunk(base, rows, row_mask, c0, C, BLOCK_C: tl.constexpr, T: tl.constexpr):
    """``[rows, c0 : c0 + BLOCK_C]`` of a row-major ``[*, C]`` matrix as ``T``, zero outside."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    return tl.load(
        base + rows[:, None] * C + offs_c[None, :], mask=row_mask[:, None] & (offs_c < C)[None, :], other=0.0
    ).to(T)


@triton.jit
def _store_t(base, acc_t, offs_g, g_mask, c0, C, BLOCK_C: tl.constexpr):
    """Store a transposed chunk ``acc_t [BLOCK_C, BLOCK_G]`` into a row-major ``[G, C]`` matrix at columns c0.."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    tl.store(
        base + offs_g[None, :] * C + offs_c[:, None],
        acc_t.to(base.dtype.element_ty),
        mask=g_mask[None, :] & (offs_c < C)[:, None],
    )


@triton.jit
def _logits(
    s,
    scale,
    noise_base,
    seed,
    ctr_base,
    offs_n,
    n_mask,
    offs_g,
    g_mask,
    N,
    NOISE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    CD: tl.constexpr,
):
    """``x = scale * s + noise`` for a token tile ``[BLOCK_N, BLOCK_G]`` in ``CD``; padded groups are -inf."""
    x = s * scale
    if NOISE == _PHILOX:  # in-kernel Philox Gumbel noise, logical counters (see _noise_tile)
        x += _noise_tile(seed, ctr_base, 0, offs_n, N, BLOCK_N, BLOCK_G).to(CD)
    elif NOISE == _TENSOR:  # explicit noise tensor [B, G, N]
        x += tl.load(
            noise_base + offs_g[None, :] * N + offs_n[:, None], mask=g_mask[None, :] & n_mask[:, None], other=0.0
        ).to(CD)
    return tl.where(g_mask[None, :], x, float("-inf"))


@triton.jit
def _group_softmax(x, inv_tau, n_mask):
    """softmax over groups (axis 1) of ``x / tau``; padded token rows are zeroed. A NaN logit makes its token NaN."""
    m = tl.max(x, axis=1)
    p = tl.exp2((x - m[:, None]) * (inv_tau * 1.4426950408889634))
    y = p / tl.sum(p, axis=1)[:, None]
    return tl.where(n_mask[:, None], y, 0.0)


@triton.jit
def _one_hot_argmax(x, offs_g, g_mask, n_mask, CD: tl.constexpr):
    """one-hot of the argmax over groups (axis 1; ties -> lowest index). A token with a NaN logit is NaN in every
    group, as the reference's ``one_hot - sg(Y) + Y`` with a NaN softmax is; padded token rows are zeroed."""
    idx = tl.argmax(x, axis=1)  # [BN]
    rs = tl.sum(tl.where(g_mask[None, :], x, 0.0), axis=1)
    a = tl.where((rs != rs)[:, None] & g_mask[None, :], float("nan"), (offs_g[None, :] == idx[:, None]).to(CD))
    return tl.where(n_mask[:, None], a, 0.0)


@triton.jit(do_not_specialize=["seed", "offset"])  # a new seed per call must not recompile
def _assign_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    noise_ptr,
    out_ptr,
    d_ptr,  # q [B,G,C]; k, v [B,N,C]; noise [B,G,N]; see PARTIAL for out, d
    seed,
    offset,
    G,
    N,
    C,
    n_split,
    scale,
    inv_tau,
    eps,
    NOISE: tl.constexpr,
    HARD: tl.constexpr,
    PARTIAL: tl.constexpr,
    CTR64: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NC: tl.constexpr,
    DOT_T: tl.constexpr,
    CD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program ``(split, b)``: image b, tokens ``[split * n_split, ..)``, all groups and all ``NC`` channel chunks.
    PARTIAL: out = unnormalised ``acc [S,B,G,C]``, d = ``[S,B,G]`` (the launcher reduces); else ``out [B,G,C]``,
    ``d [B,G]``. Accumulators are transposed (``[BLOCK_C, BLOCK_G]``: channels on the MMA's M axis)."""
    sid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_base, k_base, v_base = q_ptr + b * G * C, k_ptr + b * N * C, v_ptr + b * N * C
    noise_base = noise_ptr + b * G * N
    ctr_base = _ctr_base(offset, tl.program_id(1), G, N, CTR64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    # q resident for the whole token loop, one [BG, BC] tile per channel chunk (NC <= 4, unrolled)
    q0 = _chunk(q_base, offs_g, g_mask, 0, C, BLOCK_C, DOT_T)
    acc0 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)  # sum_n v_n A_gn, transposed
    if NC > 1:
        q1 = _chunk(q_base, offs_g, g_mask, BLOCK_C, C, BLOCK_C, DOT_T)
        acc1 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)
    if NC > 2:
        q2 = _chunk(q_base, offs_g, g_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T)
        acc2 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)
    if NC > 3:
        q3 = _chunk(q_base, offs_g, g_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T)
        acc3 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)
    dsum = tl.zeros([BLOCK_G], dtype=CD)  # sum_n A_gn
    n_lo = sid * n_split
    n_hi = tl.minimum(N, n_lo + n_split)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        # logits, transposed: s [BN, BG] = k q^T over all channels, once per logit
        s = tl.dot(
            _chunk(k_base, offs_n, n_mask, 0, C, BLOCK_C, DOT_T), tl.trans(q0), input_precision=PREC, out_dtype=CD
        )
        if NC > 1:
            s = tl.dot(
                _chunk(k_base, offs_n, n_mask, BLOCK_C, C, BLOCK_C, DOT_T),
                tl.trans(q1),
                s,
                input_precision=PREC,
                out_dtype=CD,
            )
        if NC > 2:
            s = tl.dot(
                _chunk(k_base, offs_n, n_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T),
                tl.trans(q2),
                s,
                input_precision=PREC,
                out_dtype=CD,
            )
        if NC > 3:
            s = tl.dot(
                _chunk(k_base, offs_n, n_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T),
                tl.trans(q3),
                s,
                input_precision=PREC,
                out_dtype=CD,
            )
        x = _logits(
            s, scale, noise_base, seed, ctr_base, offs_n, n_mask, offs_g, g_mask, N, NOISE, BLOCK_N, BLOCK_G, CD
        )
        if HARD:  # argmax of the softmax = argmax of its input: no exponentials in the hard forward
            a = _one_hot_argmax(x, offs_g, g_mask, n_mask, CD)
        else:
            a = _group_softmax(x, inv_tau, n_mask)
        at = a.to(DOT_T)
        acc0 = tl.dot(
            tl.trans(_chunk(v_base, offs_n, n_mask, 0, C, BLOCK_C, DOT_T)), at, acc0, input_precision=PREC, out_dtype=CD
        )
        if NC > 1:
            acc1 = tl.dot(
                tl.trans(_chunk(v_base, offs_n, n_mask, BLOCK_C, C, BLOCK_C, DOT_T)),
                at,
                acc1,
                input_precision=PREC,
                out_dtype=CD,
            )
        if NC > 2:
            acc2 = tl.dot(
                tl.trans(_chunk(v_base, offs_n, n_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T)),
                at,
                acc2,
                input_precision=PREC,
                out_dtype=CD,
            )
        if NC > 3:
            acc3 = tl.dot(
                tl.trans(_chunk(v_base, offs_n, n_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T)),
                at,
                acc3,
                input_precision=PREC,
                out_dtype=CD,
            )
        dsum += tl.sum(a, axis=0)

    if PARTIAL:  # unnormalised partial sums of this token split
        row = sid * tl.num_programs(1) + b
        r = tl.full([BLOCK_G], 1.0, dtype=CD)
        tl.store(d_ptr + row * G + offs_g, dsum, mask=g_mask)
    else:
        row = b
        r = 1.0 / (dsum + eps)
        tl.store(d_ptr + row * G + offs_g, dsum, mask=g_mask)
    o_base = out_ptr + row * G * C
    _store_t(o_base, acc0 * r[None, :], offs_g, g_mask, 0, C, BLOCK_C)
    if NC > 1:
        _store_t(o_base, acc1 * r[None, :], offs_g, g_mask, BLOCK_C, C, BLOCK_C)
    if NC > 2:
        _store_t(o_base, acc2 * r[None, :], offs_g, g_mask, 2 * BLOCK_C, C, BLOCK_C)
    if NC > 3:
        _store_t(o_base, acc3 * r[None, :], offs_g, g_mask, 3 * BLOCK_C, C, BLOCK_C)


@triton.jit
def _tile_grads(
    x,
    dw,
    delta,
    rinv,
    scale,
    inv_tau,
    offs_g,
    g_mask,
    n_mask,
    HARD: tl.constexpr,
    DOT_T: tl.constexpr,
    CD: tl.constexpr,
):
    """A token tile's ``(ds, wt)`` ``[BN, BG]`` (in ``DOT_T``) from its logits ``x`` (:func:`_logits`) and
    ``dw = v dO^T``: group softmax (and argmax), then docs/kernels.md §1.2 steps 2-4."""
    y = _group_softmax(x, inv_tau, n_mask)  # [BN, BG]
    if HARD:
        a = _one_hot_argmax(x, offs_g, g_mask, n_mask, CD)
    else:
        a = y
    da = (dw - delta[None, :]) * rinv[None, :]  # through the normalisation; straight-through: dY = dA
    dz = y * (da - tl.sum(y * da, axis=1)[:, None])  # group-softmax backward
    ds = (dz * (scale * inv_tau)).to(DOT_T)  # d(q.k) [BN, BG]; zero on padded rows/columns (y = 0 there)
    wt = (a * rinv[None, :]).to(DOT_T)  # normalised assignment [BN, BG]
    return ds, wt


@triton.jit
def _bwd_chunk(
    ds,
    wt,
    k_c,
    q_c,
    do_c,
    dq_c,
    dk_base,
    dv_base,
    offs_n,
    n_mask,
    c0,
    C,
    BLOCK_C: tl.constexpr,
    DOT_T: tl.constexpr,
    CD: tl.constexpr,
    PREC: tl.constexpr,
):
    """One channel chunk of a token tile's backward: stores dk, dv ``[BN, BC]`` and returns the updated
    ``dq_c^T [BC, BG]``."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    nc_off = offs_n[None, :] * C + offs_c[:, None]
    nc_mask = n_mask[None, :] & (offs_c < C)[:, None]
    dk = tl.dot(tl.trans(q_c), tl.trans(ds), input_precision=PREC, out_dtype=CD)  # dk^T [BC, BN]
    tl.store(dk_base + nc_off, dk.to(dk_base.dtype.element_ty), mask=nc_mask)
    dv = tl.dot(tl.trans(do_c), tl.trans(wt), input_precision=PREC, out_dtype=CD)  # dv^T [BC, BN]
    tl.store(dv_base + nc_off, dv.to(dv_base.dtype.element_ty), mask=nc_mask)
    return tl.dot(tl.trans(k_c), ds, dq_c, input_precision=PREC, out_dtype=CD)  # [BC, BG]


@triton.jit(do_not_specialize=["seed", "offset"])
def _assign_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    noise_ptr,
    out_ptr,
    d_ptr,
    do_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    seed,
    offset,
    G,
    N,
    C,
    n_split,
    scale,
    inv_tau,
    eps,
    NOISE: tl.constexpr,
    HARD: tl.constexpr,
    PARTIAL: tl.constexpr,
    CTR64: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NC: tl.constexpr,
    DOT_T: tl.constexpr,
    CD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program ``(split, b)`` as in the forward; q and dO resident, logits / noise / softmax / dO v^T once per
    logit. PARTIAL: dq is an fp32 ``[S,B,G,C]`` buffer of per-split sums (the launcher reduces)."""
    sid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_base, k_base, v_base = q_ptr + b * G * C, k_ptr + b * N * C, v_ptr + b * N * C
    o_base, do_base = out_ptr + b * G * C, do_ptr + b * G * C
    dk_base, dv_base = dk_ptr + b * N * C, dv_ptr + b * N * C
    noise_base = noise_ptr + b * G * N
    ctr_base = _ctr_base(offset, tl.program_id(1), G, N, CTR64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    # 1/(d_g + eps); zero on padded groups (with eps = 0 it would be inf there and 0 * inf = NaN would leak)
    rinv = tl.where(g_mask, 1.0 / (tl.load(d_ptr + b * G + offs_g, mask=g_mask, other=1.0).to(CD) + eps), 0.0)
    # resident q, dO chunks; Delta_g = dO_g . O_g  [BG]
    q0 = _chunk(q_base, offs_g, g_mask, 0, C, BLOCK_C, DOT_T)
    do0 = _chunk(do_base, offs_g, g_mask, 0, C, BLOCK_C, DOT_T)
    delta = tl.sum(_chunk(o_base, offs_g, g_mask, 0, C, BLOCK_C, CD) * do0.to(CD), axis=1)
    dq0 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)
    if NC > 1:
        q1 = _chunk(q_base, offs_g, g_mask, BLOCK_C, C, BLOCK_C, DOT_T)
        do1 = _chunk(do_base, offs_g, g_mask, BLOCK_C, C, BLOCK_C, DOT_T)
        delta += tl.sum(_chunk(o_base, offs_g, g_mask, BLOCK_C, C, BLOCK_C, CD) * do1.to(CD), axis=1)
        dq1 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)
    if NC > 2:
        q2 = _chunk(q_base, offs_g, g_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T)
        do2 = _chunk(do_base, offs_g, g_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T)
        delta += tl.sum(_chunk(o_base, offs_g, g_mask, 2 * BLOCK_C, C, BLOCK_C, CD) * do2.to(CD), axis=1)
        dq2 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)
    if NC > 3:
        q3 = _chunk(q_base, offs_g, g_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T)
        do3 = _chunk(do_base, offs_g, g_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T)
        delta += tl.sum(_chunk(o_base, offs_g, g_mask, 3 * BLOCK_C, C, BLOCK_C, CD) * do3.to(CD), axis=1)
        dq3 = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)

    n_lo = sid * n_split
    n_hi = tl.minimum(N, n_lo + n_split)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        k0 = _chunk(k_base, offs_n, n_mask, 0, C, BLOCK_C, DOT_T)  # [BN, BC]
        s = tl.dot(k0, tl.trans(q0), input_precision=PREC, out_dtype=CD)  # [BN, BG]
        dw = tl.dot(
            _chunk(v_base, offs_n, n_mask, 0, C, BLOCK_C, DOT_T), tl.trans(do0), input_precision=PREC, out_dtype=CD
        )  # dWt^T = v dO^T  [BN, BG]
        if NC > 1:
            k1 = _chunk(k_base, offs_n, n_mask, BLOCK_C, C, BLOCK_C, DOT_T)
            s = tl.dot(k1, tl.trans(q1), s, input_precision=PREC, out_dtype=CD)
            dw = tl.dot(
                _chunk(v_base, offs_n, n_mask, BLOCK_C, C, BLOCK_C, DOT_T),
                tl.trans(do1),
                dw,
                input_precision=PREC,
                out_dtype=CD,
            )
        if NC > 2:
            k2 = _chunk(k_base, offs_n, n_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T)
            s = tl.dot(k2, tl.trans(q2), s, input_precision=PREC, out_dtype=CD)
            dw = tl.dot(
                _chunk(v_base, offs_n, n_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T),
                tl.trans(do2),
                dw,
                input_precision=PREC,
                out_dtype=CD,
            )
        if NC > 3:
            k3 = _chunk(k_base, offs_n, n_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T)
            s = tl.dot(k3, tl.trans(q3), s, input_precision=PREC, out_dtype=CD)
            dw = tl.dot(
                _chunk(v_base, offs_n, n_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T),
                tl.trans(do3),
                dw,
                input_precision=PREC,
                out_dtype=CD,
            )
        x = _logits(
            s, scale, noise_base, seed, ctr_base, offs_n, n_mask, offs_g, g_mask, N, NOISE, BLOCK_N, BLOCK_G, CD
        )
        ds, wt = _tile_grads(x, dw, delta, rinv, scale, inv_tau, offs_g, g_mask, n_mask, HARD, DOT_T, CD)
        dq0 = _bwd_chunk(ds, wt, k0, q0, do0, dq0, dk_base, dv_base, offs_n, n_mask, 0, C, BLOCK_C, DOT_T, CD, PREC)
        if NC > 1:
            dq1 = _bwd_chunk(
                ds, wt, k1, q1, do1, dq1, dk_base, dv_base, offs_n, n_mask, BLOCK_C, C, BLOCK_C, DOT_T, CD, PREC
            )
        if NC > 2:
            dq2 = _bwd_chunk(
                ds, wt, k2, q2, do2, dq2, dk_base, dv_base, offs_n, n_mask, 2 * BLOCK_C, C, BLOCK_C, DOT_T, CD, PREC
            )
        if NC > 3:
            dq3 = _bwd_chunk(
                ds, wt, k3, q3, do3, dq3, dk_base, dv_base, offs_n, n_mask, 3 * BLOCK_C, C, BLOCK_C, DOT_T, CD, PREC
            )

    if PARTIAL:
        dq_base = dq_ptr + (sid * tl.num_programs(1) + b) * G * C
    else:
        dq_base = dq_ptr + b * G * C
    _store_t(dq_base, dq0, offs_g, g_mask, 0, C, BLOCK_C)
    if NC > 1:
        _store_t(dq_base, dq1, offs_g, g_mask, BLOCK_C, C, BLOCK_C)
    if NC > 2:
        _store_t(dq_base, dq2, offs_g, g_mask, 2 * BLOCK_C, C, BLOCK_C)
    if NC > 3:
        _store_t(dq_base, dq3, offs_g, g_mask, 3 * BLOCK_C, C, BLOCK_C)


@triton.jit(do_not_specialize=["seed", "offset"])
def _assign_bwd_streamed_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    noise_ptr,
    out_ptr,
    d_ptr,
    do_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    seed,
    offset,
    G,
    N,
    C,
    scale,
    inv_tau,
    eps,
    NOISE: tl.constexpr,
    HARD: tl.constexpr,
    CTR64: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_T: tl.constexpr,
    CD: tl.constexpr,
    PREC: tl.constexpr,
):
    """The backward where the resident one does not fit shared memory (fp32 at G = 64, C = 384) or spills (16-bit at
    G = 64 on sm_80; docs/kernels.md §1.3). Program ``(chunk, b)`` owns channels ``[chunk * BLOCK_C, ..)`` of dq,
    dk, dv: per token tile it computes the logits and ``dO v^T`` over all channels in a loop whose q / dO chunks are
    read again from L2 (only its own chunk stays resident), so every logit is computed once per channel chunk:
    ``ceil(C / BLOCK_C)`` times."""
    cid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_base, k_base, v_base = q_ptr + b * G * C, k_ptr + b * N * C, v_ptr + b * N * C
    o_base, do_base = out_ptr + b * G * C, do_ptr + b * G * C
    dk_base, dv_base = dk_ptr + b * N * C, dv_ptr + b * N * C
    noise_base = noise_ptr + b * G * N
    ctr_base = _ctr_base(offset, tl.program_id(1), G, N, CTR64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    rinv = tl.where(g_mask, 1.0 / (tl.load(d_ptr + b * G + offs_g, mask=g_mask, other=1.0).to(CD) + eps), 0.0)
    delta = tl.zeros([BLOCK_G], dtype=CD)  # Delta_g = dO_g . O_g over all channels
    for c0 in range(0, C, BLOCK_C):
        delta += tl.sum(
            _chunk(o_base, offs_g, g_mask, c0, C, BLOCK_C, CD) * _chunk(do_base, offs_g, g_mask, c0, C, BLOCK_C, CD),
            axis=1,
        )
    c_own = cid * BLOCK_C
    q_own = _chunk(q_base, offs_g, g_mask, c_own, C, BLOCK_C, DOT_T)
    do_own = _chunk(do_base, offs_g, g_mask, c_own, C, BLOCK_C, DOT_T)
    dq = tl.zeros([BLOCK_C, BLOCK_G], dtype=CD)  # dq^T of the own chunk
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        s = tl.zeros([BLOCK_N, BLOCK_G], dtype=CD)
        dw = tl.zeros([BLOCK_N, BLOCK_G], dtype=CD)
        for c0 in range(0, C, BLOCK_C):
            s = tl.dot(
                _chunk(k_base, offs_n, n_mask, c0, C, BLOCK_C, DOT_T),
                tl.trans(_chunk(q_base, offs_g, g_mask, c0, C, BLOCK_C, DOT_T)),
                s,
                input_precision=PREC,
                out_dtype=CD,
            )
            dw = tl.dot(
                _chunk(v_base, offs_n, n_mask, c0, C, BLOCK_C, DOT_T),
                tl.trans(_chunk(do_base, offs_g, g_mask, c0, C, BLOCK_C, DOT_T)),
                dw,
                input_precision=PREC,
                out_dtype=CD,
            )
        x = _logits(
            s, scale, noise_base, seed, ctr_base, offs_n, n_mask, offs_g, g_mask, N, NOISE, BLOCK_N, BLOCK_G, CD
        )
        ds, wt = _tile_grads(x, dw, delta, rinv, scale, inv_tau, offs_g, g_mask, n_mask, HARD, DOT_T, CD)
        k_own = _chunk(k_base, offs_n, n_mask, c_own, C, BLOCK_C, DOT_T)
        dq = _bwd_chunk(
            ds, wt, k_own, q_own, do_own, dq, dk_base, dv_base, offs_n, n_mask, c_own, C, BLOCK_C, DOT_T, CD, PREC
        )
    _store_t(dq_ptr + b * G * C, dq, offs_g, g_mask, c_own, C, BLOCK_C)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_kernel(out_ptr, seed, offset, G, N, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, CTR64: tl.constexpr):
    """Materialise the kernel's noise into a contiguous ``[B,G,N]`` tensor; program (token block, group block, b)."""
    b = tl.program_id(2)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g0 = tl.program_id(1) * BLOCK_G
    offs_g = g0 + tl.arange(0, BLOCK_G)
    z = _noise_tile(seed, _ctr_base(offset, b, G, N, CTR64), g0, offs_n, N, BLOCK_N, BLOCK_G)  # [BN, BG]
    tl.store(
        out_ptr + b.to(tl.int64) * G * N + offs_g[None, :] * N + offs_n[:, None],
        z,
        mask=(offs_g < G)[None, :] & (offs_n < N)[:, None],
    )


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_bits_kernel(out_ptr, seed, offset, numel, BLOCK: tl.constexpr):
    """The four raw Philox words behind ``tl.randint4x`` (as int32) at counters ``offset + i``: ``out [numel, 4]``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(seed, offset + i)
    m = i < numel
    tl.store(out_ptr + 4 * i, r0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int32, bitcast=True), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
MAX_CHUNKS, MAX_BLOCK_C = 4, 128  # channels per program: up to 4 unrolled chunks of up to 128
ACC_BUDGET = 64 * 512  # BLOCK_G * NC * BLOCK_C: fp32 accumulators of 128 registers per thread at 8 warps
_SMS = 132  # H100/H200 SXM SMs: the token split's target when no CUDA device says otherwise


def _types(dtype: torch.dtype) -> tuple:
    """(dot operand dtype, compute dtype, dot precision) for an input dtype. fp32 runs on tensor cores at tf32
    (operands rounded to a 10-bit mantissa, fp32 accumulation; logits off by ~1e-3 relative, so a hard argmax may
    differ from fp32 where the top-2 margin is below that) whatever ``torch.get_float32_matmul_precision()`` says:
    tf32x3 compiled for sm_90a spills and needs 250-830 KB of shared memory at the model shapes. fp64 stays exact
    ("ieee", FMA on the GPU) for gradcheck."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.bfloat16 and INTERPRET:  # interpreter: bf16 dot/arithmetic is broken, upcast after loads
        return tl.float32, tl.float32, "ieee"
    prec = "tf32"
    return _TL_DTYPE[dtype], tl.float32, prec


def _channel_blocks(g: int, c: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_C, NC): groups padded to a power of two >= 8 (>= 16 in the backward, whose dk / dv dots
    reduce over groups and need K >= 16), channels as NC <= 4 chunks of BLOCK_C."""
    bg = max(16 if backward else 8, triton.next_power_of_2(g))
    bc = MAX_BLOCK_C if c > MAX_BLOCK_C else max(16, triton.next_power_of_2(c))
    return bg, bc, triton.cdiv(c, bc)


RESIDENT_BUDGET = 4 * 64 * 384 * 2  # bytes of resident q / dO copies in the backward: stage 1 bf16, which fits


def _fits(g: int, c: int) -> bool:
    bg, bc, nc = _channel_blocks(g, c)
    return nc <= MAX_CHUNKS and bg * nc * bc <= ACC_BUDGET


def _resident_fits(g: int, c: int, dtype: torch.dtype) -> bool:
    """Whether the backward's resident q / dO tiles (each held twice) fit a GPU block's shared memory: true for
    16-bit inputs at every model shape, false for fp32 and fp64 at stage 1."""
    bg, bc, nc = _channel_blocks(g, c, backward=True)
    es = torch.empty((), dtype=dtype).element_size() * (2 if dtype == torch.float64 else 1)  # fp64: measured ~2x
    return 4 * bg * nc * bc * es <= RESIDENT_BUDGET


def _fits_smem(g: int, c: int, dtype: torch.dtype, backward: bool = True) -> bool:
    """Whether the op runs on a GPU at ``(g, c)``: 16-bit inputs where the backward's resident tiles fit
    (:func:`_resident_fits`; the forward always), fp32 always (a backward whose resident tiles do not fit is the
    streamed kernel), fp64 (FMA, the exact path for gradcheck) only where they fit, forward included. No limit in
    the interpreter."""
    if INTERPRET or dtype == torch.float32 or (not backward and dtype != torch.float64):
        return True
    return _resident_fits(g, c, dtype)


def _config(
    b: int,
    g: int,
    n: int,
    c: int,
    dtype: torch.dtype,
    backward: bool,
    num_sms: int = _SMS,
    noise: int = 0,
    arch: int = 90,
) -> dict:
    """Launch config: tiles, warps, stages and the token split ``SPLITS`` (programs per image).

    GPU choices, from sm_90a builds (``python -m bench.kernel_report``; no GPU timing yet): the transposed
    accumulators ``[BLOCK_C, BLOCK_G]`` put channels on the MMA's M axis, so G = 8 needs no padding; q (and dO)
    stay in shared memory. k / v token tiles: triple-buffered in the 16-bit forward at G > 16 (176 KB), else
    double-buffered (stage 2 spills with three), single-buffered in the backward with an explicit noise tensor
    (double would exceed 227 KB). Warps: 8 in the backward, for fp32, and once the forward's accumulators exceed
    64 registers per thread at 4. Backward token tiles of 16 at G = 64 (32 and 64 spill: measured). ``arch`` < 90
    (A100, mma.sync only, 163 KB): forward tiles of 16, two stages (the sm_90 tiles spill there); fp32 single-staged,
    its backward on token tiles of 16 (spill-free and within 163 KB, sm_80 builds). Tokens are
    split across programs only when B programs leave SMs idle (448-px crops at small B); the partial sums are
    reduced in a fixed order (deterministic).
    ``STREAMED`` (backward only): :func:`_assign_bwd_streamed_kernel`, one program per image and channel chunk, for
    fp32 where the resident q / dO would not fit (stage 1: 438-462 KB) and for the 16-bit backward at G > 16 on
    sm_80 (the resident kernel spills 52-176 B there): 16-token tiles, one stage, 8 warps; 64-channel chunks for
    fp32 on sm_90 (128 spill 68 B), else 128 (sm_80 builds spill-free).
    Interpreter: whole dimensions in one tile (few, large programs), no split."""
    bg, bc, nc = _channel_blocks(g, c, backward)
    if INTERPRET:
        bc = max(16, triton.next_power_of_2(c))
        return dict(
            BLOCK_G=bg,
            BLOCK_N=max(16, min(triton.next_power_of_2(max(n, 1)), 1024)),
            BLOCK_C=bc,
            NC=1,
            SPLITS=1,
            num_warps=4,
            num_stages=1,
        )
    wide = 4 if dtype == torch.float32 or dtype == torch.float64 else 2
    if backward and (
        (dtype == torch.float32 and not _resident_fits(g, c, dtype)) or (arch < 90 and wide == 2 and bg > 16)
    ):
        sbc = min(bc, 64) if arch >= 90 and wide == 4 else bc
        return dict(
            BLOCK_G=bg,
            BLOCK_N=16,
            BLOCK_C=sbc,
            NC=triton.cdiv(c, sbc),
            SPLITS=1,
            STREAMED=True,
            num_warps=8,
            num_stages=1,
        )
    bn = 64 if bg <= 16 else 32
    if wide == 4 or (backward and (bg > 16 or noise == NOISE_TENSOR)) or (arch < 90 and bg > 16):
        bn //= 2
    if arch < 90 and backward and wide == 4:
        bn //= 2
    warps = 8 if backward or wide == 4 or bg * nc * bc > 4 * 32 * 64 else 4
    tiles = triton.cdiv(max(n, 1), bn)
    splits = 1 if b >= num_sms else min(tiles, max(1, num_sms // max(b, 1)))
    if arch < 90 and wide == 4 and (backward or bg > 16):
        stages = 1  # sm_80 fp32: two stages spill (forward, G = 64) or exceed 163 KB (backward)
    elif backward:
        stages = 1 if noise == NOISE_TENSOR else 2
    else:
        stages = 3 if wide == 2 and bg > 16 and arch >= 90 else 2
    return dict(BLOCK_G=bg, BLOCK_N=bn, BLOCK_C=bc, NC=nc, SPLITS=splits, num_warps=warps, num_stages=stages)


def _split(n: int, cfg: dict) -> tuple[int, int]:
    """(programs per image, tokens per program): whole BLOCK_N tiles."""
    per = triton.cdiv(triton.cdiv(max(n, 1), cfg["SPLITS"]), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return triton.cdiv(max(n, 1), per), per


def _ctr64(offset: int, b: int, g: int, n: int) -> bool:
    """Whether Philox counters of this call may exceed int32 (then the kernels count in int64)."""
    return offset + b * triton.cdiv(g, 4) * max(n, 1) >= 2**31


def _launch(
    kernel,
    b: int,
    g: int,
    n: int,
    c: int,
    dtype: torch.dtype,
    backward: bool,
    blocks,
    args: tuple,
    seed: int,
    offset: int,
    tau: float,
    hard: bool,
    noise_mode: int,
    eps: float,
    scale: float,
    partial: bool,
) -> None:
    cfg = {**_config(b, g, n, c, dtype, backward, _num_sms(), noise_mode, _arch()), **(blocks or {})}
    streamed = cfg.pop("STREAMED", False) and backward  # a forward ignores it (tests share one blocks dict)
    cfg["NC"] = triton.cdiv(c, cfg["BLOCK_C"])
    splits, per = _split(n, cfg)
    del cfg["SPLITS"]
    dot_t, cd, prec = _types(dtype)
    flags = dict(NOISE=noise_mode, HARD=hard, CTR64=_ctr64(offset, b, g, n), DOT_T=dot_t, CD=cd, PREC=prec)
    try:
        if streamed:  # grid (channel chunks, B); no token split (the launcher's _splits says 1)
            grid = (cfg.pop("NC"), b)
            _assign_bwd_streamed_kernel[grid](*args, seed, offset, g, n, c, scale, 1.0 / tau, eps, **flags, **cfg)
        else:
            kernel[(splits, b)](
                *args, seed, offset, g, n, c, per, scale, 1.0 / tau, eps, PARTIAL=partial, **flags, **cfg
            )
    except OutOfResources as e:  # e.g. a GPU with ~100 KB of shared memory per block (sm_86 / sm_89)
        raise RuntimeError(
            f"assign_attention ({'backward' if backward else 'forward'}, B={b} G={g} N={n} C={c}, "
            f"{dtype}): this GPU lacks the resources the kernel needs ({e}); the fused kernel's tiles are "
            f"built for sm_90 (H100/H200, 227 KB shared memory per block) and sm_80 (A100, 163 KB). Select "
            f"the eager backend on this GPU"
        ) from e


def _splits(b: int, g: int, n: int, c: int, dtype: torch.dtype, backward: bool, blocks, noise_mode: int) -> int:
    """Programs per image as :func:`_launch` will pick them (same config: the token tile depends on the noise mode;
    the streamed backward never splits tokens)."""
    cfg = {**_config(b, g, n, c, dtype, backward, _num_sms(), noise_mode, _arch()), **(blocks or {})}
    if backward and cfg.get("STREAMED"):
        return 1
    return _split(n, cfg)[0]


def _num_sms() -> int:
    if INTERPRET or not torch.cuda.is_available():
        return _SMS
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _arch() -> int:
    """Compute capability as 90, 80, ... of the current CUDA device (90 without one)."""
    if INTERPRET or not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _launch_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    tau: float,
    hard: bool,
    noise_mode: int,
    eps: float,
    scale: float,
    *,
    out: Optional[Tensor] = None,
    d: Optional[Tensor] = None,
    blocks: Optional[dict[str, int]] = None,
) -> tuple[Tensor, Tensor]:
    """Forward: returns ``out [B,G,C]`` (q's dtype) and ``d [B,G]`` (sum_n A, compute dtype). ``out``/``d`` may be
    given (tests pass guard-filled views); ``blocks`` overrides entries of the launch config (:func:`_config`)."""
    b, g, c = q.shape
    n = k.shape[1]
    cdt = compute_dtype(q.dtype)
    out = torch.empty_like(q) if out is None else out
    d = torch.empty((b, g), dtype=cdt, device=q.device) if d is None else d
    if b == 0:
        return out, d
    splits = _splits(b, g, n, c, q.dtype, False, blocks, noise_mode)
    common = (seed, offset, tau, hard, noise_mode, eps, scale)
    nz = noise if noise is not None else q
    if splits == 1:
        _launch(_assign_fwd_kernel, b, g, n, c, q.dtype, False, blocks, (q, k, v, nz, out, d), *common, False)
        return out, d
    part = torch.empty((splits, b, g, c), dtype=cdt, device=q.device)
    dpart = torch.empty((splits, b, g), dtype=cdt, device=q.device)
    _launch(_assign_fwd_kernel, b, g, n, c, q.dtype, False, blocks, (q, k, v, nz, part, dpart), *common, True)
    torch.sum(dpart, 0, out=d)
    out.copy_(part.sum(0) / (d + eps)[..., None])
    return out, d


def _launch_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    d: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    tau: float,
    hard: bool,
    noise_mode: int,
    eps: float,
    scale: float,
    *,
    grads: Optional[tuple[Tensor, Tensor, Tensor]] = None,
    blocks: Optional[dict[str, int]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: ``dq, dk, dv`` in the input dtype. Recomputes logits, noise, softmax and argmax once per logit."""
    b, g, c = q.shape
    n = k.shape[1]
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if b == 0:
        return dq, dk, dv
    dout = dout.contiguous()
    splits = _splits(b, g, n, c, q.dtype, True, blocks, noise_mode)
    common = (seed, offset, tau, hard, noise_mode, eps, scale)
    nz = noise if noise is not None else q
    if splits == 1:
        _launch(
            _assign_bwd_kernel,
            b,
            g,
            n,
            c,
            q.dtype,
            True,
            blocks,
            (q, k, v, nz, out, d, dout, dq, dk, dv),
            *common,
            False,
        )
        return dq, dk, dv
    part = torch.empty((splits, b, g, c), dtype=compute_dtype(q.dtype), device=q.device)
    _launch(
        _assign_bwd_kernel, b, g, n, c, q.dtype, True, blocks, (q, k, v, nz, out, d, dout, part, dk, dv), *common, True
    )
    dq.copy_(part.sum(0))
    return dq, dk, dv


def _check_launchable(device: torch.device, what: str) -> None:
    if triton_can_launch(device, INTERPRET):
        return
    if device.type == "cpu":
        raise ValueError(
            f"{what}: CPU tensors need the Triton interpreter. Use CUDA tensors, set TRITON_INTERPRET=1 "
            f"before importing kernels.assign_attention, or select the eager backend."
        )
    raise ValueError(f"{what}: unsupported device {device}; use CUDA (or CPU under TRITON_INTERPRET=1)")


_STREAM_BLOCK = 1 << 16 if INTERPRET else 1024  # elements per program of the noise/bits materialisers


_DRAWS = torch.zeros((1,), dtype=torch.int64)  # seeds drawn so far; mutated by every draw (see _seed_op)


@torch.library.custom_op(
    "groupvit_kernels::assign_attention_seed", mutates_args=("draws",), tags=(torch.Tag.nondeterministic_seeded,)
)
def _seed_op(like: Tensor, draws: Tensor) -> Tensor:
    """A fresh Philox seed as a CPU int64 ``[1]`` tensor in ``[0, 2**31 - 1)``, from torch's default CPU generator
    whatever ``like``'s device (so ``torch.manual_seed`` governs it and a CUDA call needs no host-device sync).
    ``like`` (the call's q) is not read: it orders the draw after q exists. ``draws`` (:data:`_DRAWS`) is
    incremented: a side effect that chains successive draws in a compiled graph, so that none is merged with
    another (common-subexpression elimination would merge two draws on the same q otherwise). A custom op (one
    graph node, run eagerly by every torch.compile backend): compiled and eager runs draw the same seeds."""
    del like
    draws += 1
    return torch.randint(0, 2**31 - 1, (1,))


@_seed_op.register_fake
def _seed_fake(like, draws):
    return torch.empty((1,), dtype=torch.int64)


def draw_seed(device: torch.device | str | None = None) -> int:
    """The seed :func:`assign_attention` draws for its next call with in-kernel noise (offset 0), as an int: the
    same draw from torch's default CPU generator for every ``device``. ``gumbel_noise(draw_seed(), 0, shape)``
    after the same ``torch.manual_seed`` is therefore that call's noise."""
    del device  # same generator for every device, see docstring
    return _host_seed(_seed_op(torch.empty(0), _DRAWS))


def _host_seed(seed: Optional[Tensor]) -> int:
    """The seed a kernel launch takes: the CPU ``[1]`` tensor's value (a host read, no device sync), 0 for None."""
    return 0 if seed is None else int(seed[0])


def gumbel_noise(seed: int, offset: int, shape: tuple[int, int, int], device: torch.device | str) -> Tensor:
    """The Gumbel noise ``[B,G,N]`` (fp32) that the kernel adds for ``(seed, offset)``: same ``@triton.jit`` device
    function, same logical counters (element ``(b, g, n)`` is word ``g % 4`` of Philox counter
    ``offset + (b * ceil(G/4) + g // 4) * N + n``). ``reference.assign_attention(..., gumbel=True,
    noise=gumbel_noise(...))`` therefore sees exactly the kernel's noise."""
    device = torch.device(device)
    _check_launchable(device, f"gumbel_noise(shape={tuple(shape)})")
    if len(shape) != 3:
        raise ValueError(f"gumbel_noise: shape must be (B, G, N), got {tuple(shape)}")
    b, g, n = shape
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    if out.numel():
        bg = min(max(4, triton.next_power_of_2(g)), 64)
        bn = max(16, min(triton.next_power_of_2(n), _STREAM_BLOCK // bg))
        _gumbel_kernel[(triton.cdiv(n, bn), triton.cdiv(g, bg), b)](
            out, seed, offset, g, n, BLOCK_N=bn, BLOCK_G=bg, CTR64=_ctr64(offset, b, g, n)
        )
    return out


def philox_bits(seed: int, offset: int, numel: int, device: torch.device | str) -> Tensor:
    """The four raw Philox words ``tl.randint4x(seed, offset + i)`` for ``i < numel``: int32 ``[numel, 4]``
    (uint32 bit patterns)."""
    device = torch.device(device)
    _check_launchable(device, f"philox_bits(numel={numel})")
    out = torch.empty((numel, 4), dtype=torch.int32, device=device)
    if numel:
        _philox_bits_kernel[(triton.cdiv(numel, _STREAM_BLOCK),)](out, seed, offset, numel, BLOCK=_STREAM_BLOCK)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Autograd: forward/backward custom ops (one node each under torch.compile) tied by register_autograd
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("groupvit_kernels::assign_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    noise: Optional[Tensor],
    seed: Optional[Tensor],
    offset: int,
    tau: float,
    hard: bool,
    noise_mode: int,
    eps: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return _launch_fwd(q, k, v, noise, _host_seed(seed), offset, tau, hard, noise_mode, eps, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, noise, seed, offset, tau, hard, noise_mode, eps, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=compute_dtype(q.dtype))


@torch.library.custom_op("groupvit_kernels::assign_attention_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    d: Tensor,
    noise: Optional[Tensor],
    seed: Optional[Tensor],
    offset: int,
    tau: float,
    hard: bool,
    noise_mode: int,
    eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_bwd(dout, q, k, v, out, d, noise, _host_seed(seed), offset, tau, hard, noise_mode, eps, scale)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, d, noise, seed, offset, tau, hard, noise_mode, eps, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, noise, seed, *params = inputs
    out, d = output
    ctx.mark_non_differentiable(d)
    ctx.save_for_backward(q, k, v, out, d, noise, seed)  # no [B,G,N] tensor except a user-given noise
    ctx.params = params  # offset, tau, hard, noise_mode, eps, scale (Python scalars)


def _backward(ctx, dout: Tensor, _dd: Tensor):
    q, k, v, out, d, noise, seed = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout.contiguous(), q, k, v, out, d, noise, seed, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def _validate(q: Tensor, k: Tensor, v: Tensor, noise: Optional[Tensor], gumbel: bool, tau: float) -> None:
    op = "assign_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _TL_DTYPE:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if (
        q.dim() != 3
        or k.dim() != 3
        or v.dim() != 3
        or k.shape != v.shape
        or q.shape[0] != k.shape[0]
        or q.shape[2] != k.shape[2]
    ):
        raise ValueError(f"{op}: expected q [B,G,C], k [B,N,C], v [B,N,C]; got {_shapes(q, k, v)}")
    b, g, c = q.shape
    if g < 1 or c < 1:
        raise ValueError(f"{op}: G and C must be >= 1; got {_shapes(q, k, v)}")
    if g > MAX_GROUPS:
        raise ValueError(
            f"{op}: G = {g} groups exceeds the kernel's maximum of {MAX_GROUPS} "
            f"({_shapes(q, k, v)}); select the eager backend for larger G"
        )
    if not _fits(g, c):
        raise ValueError(
            f"{op}: G = {g} groups x C = {c} channels exceed what one program holds (C <= "
            f"{MAX_CHUNKS * MAX_BLOCK_C}, padded G x C <= {ACC_BUDGET}; {_shapes(q, k, v)}); use "
            f"the eager backend for this shape"
        )
    common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not _fits_smem(g, c, common, backward=needs_grad):
        raise ValueError(
            f"{op}: the {'backward' if needs_grad else 'forward'} of {common} inputs at G = {g}, C = {c} "
            f"needs more shared memory than a GPU block has (q and dO stay resident; "
            f"{_shapes(q, k, v)}); train with bf16/fp16 projections (torch.autocast), or select the "
            f"eager backend"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(
                f"{op}: {name} {tuple(t.shape)} with strides {t.stride()} is not contiguous; pass {name}.contiguous()"
            )
    if not tau > 0:
        raise ValueError(f"{op}: tau must be > 0, got {tau}")
    if noise is not None:
        if not gumbel:
            raise ValueError(f"{op}: noise given but gumbel=False")
        if tuple(noise.shape) != (b, g, k.shape[1]):
            raise ValueError(f"{op}: noise shape {tuple(noise.shape)} != logits [B,G,N] {(b, g, k.shape[1])}")
        if not noise.is_floating_point() or noise.dtype not in _TL_DTYPE:
            raise TypeError(f"{op}: noise must be float16/bfloat16/float32/float64, got {noise.dtype}")
        if noise.device != q.device:
            raise ValueError(f"{op}: noise on {noise.device}, q on {q.device}")
    if q.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            f"{op}: got CPU tensors ({_shapes(q, k, v)}) but the Triton kernels were not built for the "
            f"interpreter. Use CUDA tensors, set TRITON_INTERPRET=1 before importing kernels, or select "
            f"the eager backend."
        )
    _check_launchable(q.device, f"{op}({_shapes(q, k, v)})")


def assign_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    gumbel: bool = False,
    noise: Tensor | None = None,
    eps: float = 1.0,
    scale: float | None = None,
) -> Tensor:
    """Fused token-to-group assignment attention; same signature and semantics as
    :func:`kernels.reference.assign_attention`.

    ``q [B,G,C]``, ``k, v [B,N,C]`` (contiguous, one device, fp16/bf16/fp32/fp64; mixed dtypes are promoted) ->
    ``[B,G,C]`` in q's dtype. ``gumbel=True`` without ``noise`` draws one Philox seed per call with
    :func:`draw_seed` (offset 0) and regenerates the same noise in the backward; ``noise [B,G,N]`` replaces the
    in-kernel noise (it receives no gradient). Backward: straight-through in hard mode.
    """
    _validate(q, k, v, noise, gumbel, tau)
    out_dtype = q.dtype
    common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if not (q.dtype == k.dtype == v.dtype):
        q, k, v = q.to(common), k.to(common), v.to(common)
    s = float(q.shape[-1] ** -0.5 if scale is None else scale)
    seed = None
    if noise is not None:
        mode, noise = NOISE_TENSOR, noise.detach().contiguous()
    elif gumbel:
        mode, seed = NOISE_PHILOX, _seed_op(q, _DRAWS)  # a graph node under torch.compile, no break
    else:
        mode = NOISE_OFF
    out, _ = _fwd_op(q, k, v, noise, seed, 0, float(tau), bool(hard), mode, float(eps), s)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# variants(): keep in sync with the launchers (compiled-code report, kernels/variants.py; python -m bench.kernel_report)
# ----------------------------------------------------------------------------------------------------------------

_MODES = {
    "train": (NOISE_PHILOX, True),
    "eval": (NOISE_OFF, True),
    "soft": (NOISE_PHILOX, False),
    "noise": (NOISE_TENSOR, True),
}  # name -> (NOISE, HARD)


def variants(shape: dict[str, int], dtype: torch.dtype, num_sms: int = _SMS) -> list:
    """One :class:`kernels.variants.Variant` per config the launchers can pick at ``shape`` (registry dims
    ``B, G, N, C``) and input ``dtype`` on a GPU with ``num_sms`` SMs: forward and backward (where the public op
    allows it), every mode."""
    b, g, n, c = shape["B"], shape["G"], shape["N"], shape["C"]
    arch = 80 if num_sms == 108 else 90  # the report's two targets: A100 (108 SMs) and H100/H200 (132)
    spec = OPS["assign_attention"]
    name = DTYPE_NAMES[dtype]
    es = torch.empty((), dtype=dtype).element_size()
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    out = []
    prec = _types(dtype)[2]
    label = f"{name}-{prec}" if dtype == torch.float32 else name
    floor = {"bf16": "bf16", "fp16": "fp16", "fp64": "fp64"}.get(name, "tf32")
    for mode, (noise, hard) in _MODES.items():
        for kname, bwd in (("fwd", False), ("bwd", True)):
            if not _fits_smem(g, c, dtype, bwd):  # the public op refuses these shapes on a GPU
                continue
            cfg = _config(b, g, n, c, dtype, bwd, num_sms, noise, arch)
            streamed = cfg.pop("STREAMED", False)
            splits, per = (1, n) if streamed else _split(n, cfg)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            del cfg["SPLITS"]
            partial = splits > 1
            ptrs = dict(
                q_ptr=dtype,
                k_ptr=dtype,
                v_ptr=dtype,
                noise_ptr=torch.float32 if noise == NOISE_TENSOR else dtype,
                out_ptr=cd if partial and not bwd else dtype,
                d_ptr=cd,
                do_ptr=dtype,
                dq_ptr=cd if partial else dtype,
                dk_ptr=dtype,
                dv_ptr=dtype,
            )
            fn = _assign_bwd_streamed_kernel if streamed else _assign_bwd_kernel if bwd else _assign_fwd_kernel
            args = {p.name: ptrs[p.name] for p in fn.params if p.name in ptrs}
            args.update(
                seed=12345,
                offset=0,
                G=g,
                N=n,
                C=c,
                n_split=per,
                scale=c**-0.5,
                inv_tau=1.0,
                eps=1.0,
                NOISE=noise,
                HARD=hard,
                PARTIAL=partial,
                CTR64=_ctr64(0, b, g, n),
                DOT_T=_TL_DTYPE[dtype],
                CD=_TL_DTYPE[cd],
                PREC=prec,
                **cfg,
            )
            args = {p.name: args[p.name] for p in fn.params}  # the streamed kernel takes no NC, n_split, PARTIAL
            out.append(
                Variant(
                    op="assign_attention",
                    kernel=kname,
                    case=f"B{b}-G{g}-N{n}-C{c}",
                    dtype=label,
                    fn=fn,
                    args=args,
                    num_warps=warps,
                    num_stages=stages,
                    grid=(cfg["NC"], b) if streamed else (splits, b),
                    flops=spec.flops(shape, kname),
                    bytes=spec.bytes(shape, kname, es),
                    logits_per_iter=g * cfg["BLOCK_N"] / (cfg["NC"] if streamed else 1),  # streamed: NC programs
                    inner_trips=cfg["NC"] if streamed else 1,  # its loop over all channel chunks
                    floor_dtype=floor,
                    meta=dict(mode=mode),
                    config=("streamed " if streamed else "")
                    + " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in cfg.items())
                    + f" S={splits} w{warps} s{stages}",
                )
            )
    return out
