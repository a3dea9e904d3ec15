"""Fused GroupViT assignment attention (kernels_notes.md §1-2), spec: :func:`kernels.reference.assign_attention`.

``q [B,G,C]`` group tokens, ``k, v [B,N,C]`` image tokens. Per image and token ``n`` the logits
``x_gn = scale * q_g . k_n (+ Gumbel_gn)`` are soft-maxed over the *group* axis ``g`` (temperature ``tau``);
hard mode takes the one-hot argmax (ties -> lowest ``g``) with the straight-through softmax gradient. The output is
``O = (A @ V) / (sum_n A + eps)``.

Layout of this file: ``@triton.jit`` kernels -> launchers (validate, allocate on ``q.device``, grid, launch) ->
autograd (two ``torch.library.custom_op`` s, forward and backward, tied by ``register_autograd``; opaque to
``torch.compile``, which cannot trace an interpreter launch) -> public :func:`assign_attention`.

Design:

* Grid ``(C-chunks, B)``: a program owns one image and one ``BLOCK_C`` chunk of the output channels, holds all
  ``G`` rows (padded to >= 16 with ``-inf`` logits) and walks the image tokens once in ``BLOCK_N`` tiles. The logits
  of a tile need all of ``C``, so each channel chunk recomputes them (cheap: G*N*C per chunk, K stays in L2);
  in exchange every accumulator (``acc``, ``d``, ``dq``) lives in registers and no cross-program reduction or
  atomic is needed: results are bitwise deterministic.
* Nothing of size ``G x N`` is stored. The forward saves ``out`` and ``d [B,G]`` (group sizes, fp32); the backward
  recomputes logits, noise, softmax and argmax per tile and uses ``Delta_g = dO_g . O_g`` (notes §1.2).
* Gumbel noise comes from Philox (``tl.rand``) keyed on the *logical* element index
  ``offset + (b*G + g)*N + n``, so it does not depend on block sizes or grid; :func:`gumbel_noise` materialises
  the very same stream for the eager reference.
* Compute dtype is fp32 (fp64 for fp64 inputs, so ``gradcheck`` works). fp16/bf16 feed ``tl.dot`` natively on the
  GPU; under the interpreter bf16 is upcast right after every load (its bf16 dot is broken).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["assign_attention", "draw_seed", "gumbel_noise", "philox_bits", "MAX_GROUPS"]

# Captured once: the @triton.jit decorators below were built in this mode (interpreted or compiled).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_GROUPS = 256  # all G rows live in one program


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gumbel(seed, counter):
    """Gumbel(0,1) in fp32 from Philox-4x32-10 at ``counter`` (int64 block): ``-log(-log u)``, ``u`` clamped to
    torch's support ``[tiny, 1 - eps]`` (``tl.rand`` returns exactly 0, and 1.0 after fp32 rounding, now and then)."""
    u = tl.rand(seed, counter)
    u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 0.99999988079071044921875)
    return -tl.log(-tl.log(u))


@triton.jit
def _logits_tile(q_base, k_base, noise_base, seed, ctr_base, offs_g, g_mask, offs_n, n_mask, G, N, C, scale,
                 NOISE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_T: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr):
    """``x = scale * q k^T + noise`` for one token tile ``[BLOCK_G, BLOCK_N]`` in ``CD``; padded groups are -inf."""
    s = tl.zeros([BLOCK_G, BLOCK_N], dtype=CD)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        qt = tl.load(q_base + offs_g[:, None] * C + offs_c[None, :], mask=g_mask[:, None] & c_mask[None, :],
                     other=0.0).to(DOT_T)  # [BG, BC]
        kt = tl.load(k_base + offs_n[None, :] * C + offs_c[:, None], mask=c_mask[:, None] & n_mask[None, :],
                     other=0.0).to(DOT_T)  # [BC, BN]
        s += tl.dot(qt, kt, input_precision=PREC, out_dtype=CD)
    x = s * scale
    if NOISE == 1:  # in-kernel Philox Gumbel, logical counter (b*G + g)*N + n
        ctr = ctr_base + offs_g[:, None].to(tl.int64) * N + offs_n[None, :]
        x += _gumbel(seed, ctr).to(CD)
    elif NOISE == 2:  # explicit noise tensor [B, G, N]
        nz = tl.load(noise_base + offs_g[:, None] * N + offs_n[None, :], mask=g_mask[:, None] & n_mask[None, :],
                     other=0.0)
        x += nz.to(CD)
    return tl.where(g_mask[:, None], x, float("-inf"))


@triton.jit
def _column_softmax(x, inv_tau, n_mask):
    """softmax over groups (axis 0) of ``x / tau``; padded token columns are zeroed."""
    m = tl.max(x, axis=0)
    p = tl.exp2((x - m[None, :]) * (inv_tau * 1.4426950408889634))
    y = p / tl.sum(p, axis=0)[None, :]
    return tl.where(n_mask[None, :], y, 0.0)


@triton.jit
def _one_hot_argmax(x, offs_g, n_mask, CD: tl.constexpr):
    """one-hot of argmax over groups (ties -> lowest index); padded token columns are zeroed."""
    idx = tl.argmax(x, axis=0)  # [BN]
    return ((offs_g[:, None] == idx[None, :]) & n_mask[None, :]).to(CD)


@triton.jit(do_not_specialize=["seed", "offset"])  # a new seed per call must not recompile
def _assign_fwd_kernel(
    q_ptr, k_ptr, v_ptr, noise_ptr, out_ptr, d_ptr,  # q, out [B,G,C]; k, v [B,N,C]; noise [B,G,N]; d [B,G]
    seed, offset, G, N, C, scale, inv_tau, eps,
    NOISE: tl.constexpr, HARD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_T: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_base, k_base, v_base = q_ptr + b * G * C, k_ptr + b * N * C, v_ptr + b * N * C
    noise_base = noise_ptr + b * G * N
    ctr_base = offset + b * G * N
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    offs_co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # this program's output channels
    co_mask = offs_co < C

    acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=CD)  # sum_n A_gn v_n
    dsum = tl.zeros([BLOCK_G], dtype=CD)  # sum_n A_gn
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x = _logits_tile(q_base, k_base, noise_base, seed, ctr_base, offs_g, g_mask, offs_n, n_mask, G, N, C, scale,
                         NOISE, BLOCK_G, BLOCK_N, BLOCK_K, DOT_T, CD, PREC)
        if HARD:  # argmax of the softmax = argmax of its input: no exponentials in the hard forward
            a = _one_hot_argmax(x, offs_g, n_mask, CD)
        else:
            a = _column_softmax(x, inv_tau, n_mask)
        vt = tl.load(v_base + offs_n[:, None] * C + offs_co[None, :], mask=n_mask[:, None] & co_mask[None, :],
                     other=0.0).to(DOT_T)  # [BN, BC]
        acc += tl.dot(a.to(DOT_T), vt, input_precision=PREC, out_dtype=CD)
        dsum += tl.sum(a, axis=1)

    out = acc / (dsum + eps)[:, None]
    tl.store(out_ptr + b * G * C + offs_g[:, None] * C + offs_co[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None] & co_mask[None, :])
    tl.store(d_ptr + b * G + offs_g, dsum, mask=g_mask & (pid_c == 0))  # identical in every chunk: write once


@triton.jit(do_not_specialize=["seed", "offset"])
def _assign_bwd_kernel(
    q_ptr, k_ptr, v_ptr, noise_ptr, out_ptr, d_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr,
    seed, offset, G, N, C, scale, inv_tau, eps,
    NOISE: tl.constexpr, HARD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_T: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_base, k_base, v_base = q_ptr + b * G * C, k_ptr + b * N * C, v_ptr + b * N * C
    o_base, do_base = out_ptr + b * G * C, do_ptr + b * G * C
    noise_base = noise_ptr + b * G * N
    ctr_base = offset + b * G * N
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    offs_co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    co_mask = offs_co < C
    gc_mask = g_mask[:, None] & co_mask[None, :]

    # Delta_g = dO_g . O_g over all channels  [BG]
    delta = tl.zeros([BLOCK_G], dtype=CD)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        m = g_mask[:, None] & (offs_c < C)[None, :]
        o = tl.load(o_base + offs_g[:, None] * C + offs_c[None, :], mask=m, other=0.0).to(CD)
        do = tl.load(do_base + offs_g[:, None] * C + offs_c[None, :], mask=m, other=0.0).to(CD)
        delta += tl.sum(o * do, axis=1)
    # 1/(d_g + eps); zero on padded rows (with eps = 0 it would be inf there and 0 * inf = NaN would leak)
    rinv = tl.where(g_mask, 1.0 / (tl.load(d_ptr + b * G + offs_g, mask=g_mask, other=1.0).to(CD) + eps), 0.0)

    q_c = tl.load(q_base + offs_g[:, None] * C + offs_co[None, :], mask=gc_mask, other=0.0).to(DOT_T)  # [BG, BC]
    do_c = tl.load(do_base + offs_g[:, None] * C + offs_co[None, :], mask=gc_mask, other=0.0).to(DOT_T)
    dq = tl.zeros([BLOCK_G, BLOCK_C], dtype=CD)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x = _logits_tile(q_base, k_base, noise_base, seed, ctr_base, offs_g, g_mask, offs_n, n_mask, G, N, C, scale,
                         NOISE, BLOCK_G, BLOCK_N, BLOCK_K, DOT_T, CD, PREC)
        y = _column_softmax(x, inv_tau, n_mask)  # [BG, BN]
        if HARD:
            a = _one_hot_argmax(x, offs_g, n_mask, CD)
        else:
            a = y
        # dWt = dO v^T over all channels  [BG, BN]
        dw = tl.zeros([BLOCK_G, BLOCK_N], dtype=CD)
        for c0 in range(0, C, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_mask = offs_c < C
            dot_ = tl.load(do_base + offs_g[:, None] * C + offs_c[None, :], mask=g_mask[:, None] & c_mask[None, :],
                           other=0.0).to(DOT_T)  # [BG, BC]
            vt = tl.load(v_base + offs_n[None, :] * C + offs_c[:, None], mask=c_mask[:, None] & n_mask[None, :],
                         other=0.0).to(DOT_T)  # [BC, BN]
            dw += tl.dot(dot_, vt, input_precision=PREC, out_dtype=CD)
        da = (dw - delta[:, None]) * rinv[:, None]  # through the normalisation; straight-through: dY = dA
        dz = y * (da - tl.sum(y * da, axis=0)[None, :])  # column-softmax backward
        ds = dz * (scale * inv_tau)  # d(q.k) [BG, BN]; zero on padded rows/columns (y = 0 there)
        wt = a * rinv[:, None]  # normalised assignment [BG, BN]

        nc_mask = n_mask[:, None] & co_mask[None, :]
        k_c = tl.load(k_base + offs_n[:, None] * C + offs_co[None, :], mask=nc_mask, other=0.0).to(DOT_T)  # [BN, BC]
        dq += tl.dot(ds.to(DOT_T), k_c, input_precision=PREC, out_dtype=CD)
        dk = tl.dot(tl.trans(ds).to(DOT_T), q_c, input_precision=PREC, out_dtype=CD)  # [BN, BC]
        dv = tl.dot(tl.trans(wt).to(DOT_T), do_c, input_precision=PREC, out_dtype=CD)  # [BN, BC]
        nc_off = b * N * C + offs_n[:, None] * C + offs_co[None, :]
        tl.store(dk_ptr + nc_off, dk.to(dk_ptr.dtype.element_ty), mask=nc_mask)
        tl.store(dv_ptr + nc_off, dv.to(dv_ptr.dtype.element_ty), mask=nc_mask)

    tl.store(dq_ptr + b * G * C + offs_g[:, None] * C + offs_co[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=gc_mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_kernel(out_ptr, seed, offset, numel, BLOCK: tl.constexpr):
    """Materialise the kernel's noise: element ``i`` of a contiguous ``[B,G,N]`` tensor at counter offset + i."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _gumbel(seed, offset + i), mask=i < numel)


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_bits_kernel(out_ptr, seed, offset, numel, BLOCK: tl.constexpr):
    """Raw Philox uint32 stream (as int32) behind ``tl.rand``: for bit-exact tests against a NumPy Philox."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.randint(seed, offset + i).to(tl.int32, bitcast=True), mask=i < numel)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def _types(dtype: torch.dtype) -> tuple:
    """(dot operand dtype, compute dtype, fp32 dot precision) for an input dtype."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.bfloat16 and INTERPRET:  # interpreter: bf16 dot/arithmetic is broken, upcast after loads
        return tl.float32, tl.float32, "ieee"
    prec = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return _TL_DTYPE[dtype], tl.float32, prec


def _blocks(g: int, n: int, c: int, backward: bool) -> dict[str, int]:
    """Tile sizes and warps. ``BLOCK_C``: output channels per program; ``BLOCK_K``: channel chunk of the
    ``q k^T`` / ``dO v^T`` reductions. Interpreter: whole dimensions in one tile (few, large programs). GPU: chosen
    from ``ptxas -v`` on sm_90a builds (bf16/fp32, no GPU timing yet): the forward fits 255 registers without
    spills for G <= 64, the backward spills < 120 bytes; larger G trades channels per program for rows."""
    bg = max(16, triton.next_power_of_2(g))
    if INTERPRET:
        bc = max(16, min(triton.next_power_of_2(c), 1024))
        return dict(BLOCK_G=bg, BLOCK_N=max(16, min(triton.next_power_of_2(max(n, 1)), 1024)), BLOCK_C=bc,
                    BLOCK_K=bc)
    bc = max(16, min(triton.next_power_of_2(c), 128))
    if bg == 16:
        cfg = dict(BLOCK_N=64, BLOCK_C=bc, num_warps=8 if backward else 4)
    elif bg <= 64:
        cfg = dict(BLOCK_N=32, BLOCK_C=bc, num_warps=8)
    else:
        cfg = dict(BLOCK_N=16, BLOCK_C=min(bc, 64 if bg == 128 else 32), num_warps=8)
    return dict(BLOCK_G=bg, BLOCK_K=min(bc, 32), num_stages=2, **cfg)


def _compute_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_fwd(q: Tensor, k: Tensor, v: Tensor, noise: Optional[Tensor], seed: int, offset: int, tau: float,
                hard: bool, noise_mode: int, eps: float, scale: float, *, out: Optional[Tensor] = None,
                d: Optional[Tensor] = None, blocks: Optional[dict[str, int]] = None) -> tuple[Tensor, Tensor]:
    """Forward: returns ``out [B,G,C]`` (q's dtype) and ``d [B,G]`` (sum_n A, compute dtype). ``out``/``d`` may be
    given (tests pass guard-filled views); ``blocks`` overrides the tile sizes."""
    b, g, c = q.shape
    n = k.shape[1]
    out = torch.empty_like(q) if out is None else out
    d = torch.empty((b, g), dtype=_compute_torch_dtype(q.dtype), device=q.device) if d is None else d
    if b == 0:
        return out, d
    blk = blocks or _blocks(g, n, c, backward=False)
    dot_t, cd, prec = _types(q.dtype)
    grid = (triton.cdiv(c, blk["BLOCK_C"]), b)
    _assign_fwd_kernel[grid](
        q, k, v, noise if noise is not None else q, out, d,
        seed, offset, g, n, c, scale, 1.0 / tau, eps,
        NOISE=noise_mode, HARD=hard, DOT_T=dot_t, CD=cd, PREC=prec, **blk,
    )
    return out, d


def _launch_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, d: Tensor, noise: Optional[Tensor],
                seed: int, offset: int, tau: float, hard: bool, noise_mode: int, eps: float, scale: float, *,
                grads: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                blocks: Optional[dict[str, int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: ``dq, dk, dv`` in the input dtype. Recomputes logits, noise, softmax and argmax per tile."""
    b, g, c = q.shape
    n = k.shape[1]
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if b == 0:
        return dq, dk, dv
    dout = dout.contiguous()
    blk = blocks or _blocks(g, n, c, backward=True)
    dot_t, cd, prec = _types(q.dtype)
    grid = (triton.cdiv(c, blk["BLOCK_C"]), b)
    _assign_bwd_kernel[grid](
        q, k, v, noise if noise is not None else q, out, d, dout, dq, dk, dv,
        seed, offset, g, n, c, scale, 1.0 / tau, eps,
        NOISE=noise_mode, HARD=hard, DOT_T=dot_t, CD=cd, PREC=prec, **blk,
    )
    return dq, dk, dv


def _check_launchable(device: torch.device, what: str) -> None:
    if device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{what}: CPU tensors need the Triton interpreter. Use CUDA tensors, set TRITON_INTERPRET=1 "
                         f"before importing kernels.assign_attention, or use ops.set_backend('eager').")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: unsupported device {device}; use CUDA (or CPU under TRITON_INTERPRET=1)")


_STREAM_BLOCK = 1 << 16 if INTERPRET else 1024  # elements per program of the noise/bits materialisers


@torch.compiler.disable  # run eagerly under torch.compile (a graph break), so compiled and eager draw the same seed
def draw_seed(device: torch.device | str | None = None) -> int:
    """A fresh Philox seed in ``[0, 2**31 - 1)`` for one kernel call, drawn from torch's default CPU generator for
    every ``device`` (so ``torch.manual_seed`` governs it and a CUDA call needs no host-device sync).
    :func:`assign_attention` with in-kernel noise draws exactly one seed per call this way and uses offset 0."""
    del device  # same generator for every device, see docstring
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def gumbel_noise(seed: int, offset: int, shape: tuple[int, int, int], device: torch.device | str) -> Tensor:
    """The Gumbel noise ``[B,G,N]`` (fp32) that the kernel adds for ``(seed, offset)``: same ``@triton.jit`` device
    function, same logical counters. ``reference.assign_attention(..., gumbel=True, noise=gumbel_noise(...))``
    therefore sees exactly the kernel's noise."""
    device = torch.device(device)
    _check_launchable(device, f"gumbel_noise(shape={tuple(shape)})")
    if len(shape) != 3:
        raise ValueError(f"gumbel_noise: shape must be (B, G, N), got {tuple(shape)}")
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    numel = out.numel()
    if numel:
        _gumbel_kernel[(triton.cdiv(numel, _STREAM_BLOCK),)](out, seed, offset, numel, BLOCK=_STREAM_BLOCK)
    return out


def philox_bits(seed: int, offset: int, numel: int, device: torch.device | str) -> Tensor:
    """The raw Philox words ``tl.randint(seed, offset + i)`` for ``i < numel`` as int32 (uint32 bit pattern)."""
    device = torch.device(device)
    _check_launchable(device, f"philox_bits(numel={numel})")
    out = torch.empty(numel, dtype=torch.int32, device=device)
    if numel:
        _philox_bits_kernel[(triton.cdiv(numel, _STREAM_BLOCK),)](out, seed, offset, numel, BLOCK=_STREAM_BLOCK)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Autograd: forward/backward custom ops (opaque to torch.compile) tied by register_autograd
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("groupvit_kernels::assign_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, noise: Optional[Tensor], seed: int, offset: int, tau: float,
            hard: bool, noise_mode: int, eps: float, scale: float) -> tuple[Tensor, Tensor]:
    return _launch_fwd(q, k, v, noise, seed, offset, tau, hard, noise_mode, eps, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, noise, seed, offset, tau, hard, noise_mode, eps, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=_compute_torch_dtype(q.dtype))


@torch.library.custom_op("groupvit_kernels::assign_attention_bwd", mutates_args=())
def _bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, d: Tensor, noise: Optional[Tensor],
            seed: int, offset: int, tau: float, hard: bool, noise_mode: int, eps: float,
            scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_bwd(dout, q, k, v, out, d, noise, seed, offset, tau, hard, noise_mode, eps, scale)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, d, noise, seed, offset, tau, hard, noise_mode, eps, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, noise, *params = inputs
    out, d = output
    ctx.mark_non_differentiable(d)
    ctx.save_for_backward(q, k, v, out, d, noise)  # no [B,G,N] tensor except a user-given noise
    ctx.params = params  # seed, offset, tau, hard, noise_mode, eps, scale (Python scalars)


def _backward(ctx, dout: Tensor, _dd: Tensor):
    q, k, v, out, d, noise = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout.contiguous(), q, k, v, out, d, noise, *ctx.params)
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
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: expected q [B,G,C], k [B,N,C], v [B,N,C]; got {_shapes(q, k, v)}")
    b, g, c = q.shape
    if g < 1 or c < 1:
        raise ValueError(f"{op}: G and C must be >= 1; got {_shapes(q, k, v)}")
    if g > MAX_GROUPS:
        raise ValueError(f"{op}: G = {g} groups exceeds the kernel's maximum of {MAX_GROUPS} "
                         f"({_shapes(q, k, v)}); use ops.set_backend('eager') for larger G")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} {tuple(t.shape)} with strides {t.stride()} is not contiguous; "
                             f"pass {name}.contiguous()")
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
        raise ValueError(f"{op}: got CPU tensors ({_shapes(q, k, v)}) but the Triton kernels were not built for the "
                         f"interpreter. Use CUDA tensors, set TRITON_INTERPRET=1 before importing kernels, or use "
                         f"ops.set_backend('eager').")
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
    if noise is not None:
        mode, seed, noise = 2, 0, noise.detach().contiguous()
    elif gumbel:
        mode, seed = 1, draw_seed(q.device)
    else:
        mode, seed = 0, 0
    out, _ = _fwd_op(q, k, v, noise, seed, 0, float(tau), bool(hard), mode, float(eps), s)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# variants(): keep in sync with the launchers (compiled-code report, kernels/variants.py; python -m bench.kernel_report)
# ----------------------------------------------------------------------------------------------------------------

_MODES = {"train": (1, True), "eval": (0, True), "soft": (1, False), "noise": (2, True)}  # name -> (NOISE, HARD)


def variants(shape: dict[str, int], dtype: torch.dtype, num_sms: int = 132) -> list:
    """One :class:`kernels.variants.Variant` per config the launchers can pick at ``shape`` (registry dims
    ``B, G, N, C``) and input ``dtype`` (fp32: both matmul precisions): forward and backward, every mode."""
    from kernels.registry import OPS
    from kernels.variants import Variant

    del num_sms  # the grid does not depend on the GPU
    b, g, n, c = shape["B"], shape["G"], shape["N"], shape["C"]
    spec = OPS["assign_attention"]
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    es = torch.empty((), dtype=dtype).element_size()
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    out = []
    for prec in (("ieee", "tf32") if dtype == torch.float32 else ("ieee",)):
        label = f"{name}-{prec}" if dtype == torch.float32 else name
        floor = {"bf16": "bf16", "fp16": "fp16", "fp64": "fp64"}.get(name, "tf32" if prec == "tf32" else "fp32")
        for mode, (noise, hard) in _MODES.items():
            for kname, bwd in (("fwd", False), ("bwd", True)):
                blk = _blocks(g, n, c, backward=bwd)
                warps, stages = blk.pop("num_warps"), blk.pop("num_stages")
                chunks = triton.cdiv(c, blk["BLOCK_C"])
                ptrs = dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, noise_ptr=torch.float32 if noise == 2 else dtype,
                            out_ptr=dtype, d_ptr=cd, do_ptr=dtype, dq_ptr=dtype, dk_ptr=dtype, dv_ptr=dtype)
                fn = _assign_bwd_kernel if bwd else _assign_fwd_kernel
                args = {p.name: ptrs[p.name] for p in fn.params if p.name in ptrs}
                args.update(seed=12345, offset=0, G=g, N=n, C=c, scale=c ** -0.5, inv_tau=1.0, eps=1.0, NOISE=noise,
                            HARD=hard, DOT_T=_TL_DTYPE[dtype], CD=_TL_DTYPE[cd], PREC=prec, **blk)
                out.append(Variant(
                    op="assign_attention", kernel=kname, case=f"B{b}-G{g}-N{n}-C{c}", dtype=label, fn=fn,
                    args=args, num_warps=warps, num_stages=stages, grid=(chunks, b),
                    flops=spec.flops(shape, kname), bytes=spec.bytes(shape, kname, es),
                    logits_per_iter=g * blk["BLOCK_N"] / chunks, inner_trips=triton.cdiv(c, blk["BLOCK_K"]),
                    floor_dtype=floor, meta=dict(mode=mode),
                    config=" ".join(f"{k[6:]}={v}" for k, v in blk.items()) + f" w{warps} s{stages}"))
    return out
