"""In-kernel Gumbel noise of kernels/assign_attention.py (docs/kernels.md §2, §6 "RNG tests").

Philox words bit-exact against an independent NumPy Philox-4x32-10; Gumbel values against a NumPy transform of
those words; the Gumbel CDF (KS); the Gumbel-max trick through the fused kernel (chi-square); seeding rules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels import assign_attention as aa
from kernels import reference as R
from kernels.registry import OPS


def philox_ref(seed: int, offsets: np.ndarray, n_rounds: int = 10) -> np.ndarray:
    """NumPy Philox-4x32-10, all four output words ``[n, 4]``; key = seed (lo, hi), counter = (offset lo, offset hi,
    0, 0) as ``tl.randint4x`` builds it from a 64-bit offset."""
    ka, kb = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
    ra, rb = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    lo = np.uint64(0xFFFFFFFF)
    offsets = offsets.astype(np.uint64)
    c0, c1 = (offsets & lo).astype(np.uint32), (offsets >> np.uint64(32)).astype(np.uint32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    s = np.uint64(seed)
    k0 = np.full_like(c0, np.uint32(s & lo))
    k1 = np.full_like(c0, np.uint32(s >> np.uint64(32)))
    for _ in range(n_rounds):
        p0, p2 = ra * c0.astype(np.uint64), rb * c2.astype(np.uint64)
        c0, c2, c1, c3 = (
            (p2 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
            (p0 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
            (p2 & lo).astype(np.uint32),
            (p0 & lo).astype(np.uint32),
        )
        k0, k1 = k0 + ka, k1 + kb
    return np.stack([c0, c1, c2, c3], axis=1)


def gumbel_ref(bits: np.ndarray) -> np.ndarray:
    """The kernel's uint32 -> Gumbel map in fp32: ``u = (2 (bits >> 9) + 1) 2^-24`` (exact, inside (0, 1)), then
    ``-log(-log u)``."""
    k = (bits >> np.uint32(9)).astype(np.float32)
    u = (np.float32(2) * k + np.float32(1)) * np.float32(2.0**-24)
    return -np.log(-np.log(u))


def gumbel_stream_ref(seed: int, offset: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The documented layout: element (b, g, n) is word g % 4 of counter offset + (b ceil(G/4) + g // 4) N + n."""
    b, g, n = shape
    g4 = -(-g // 4)
    ctr = offset + (np.arange(b)[:, None, None] * g4 + np.arange(g4)[None, :, None]) * n + np.arange(n)[None, None]
    words = philox_ref(seed, ctr.reshape(-1)).reshape(b, g4, n, 4)  # [b, g4, n, word]
    return gumbel_ref(words.transpose(0, 1, 3, 2).reshape(b, 4 * g4, n)[:, :g])


SEEDS = [0, 1, 20240601, 2**31 - 2, 0xFFFFFFFF, 0x0000000FCAFEB0BA]


@pytest.mark.parametrize("seed", SEEDS, ids=hex)
@pytest.mark.parametrize("offset", [0, 12345, 2**32 - 5000])
def test_philox_words_bit_exact(seed, offset, device):
    """All four words of tl.randint4x, also across the 2**32 counter boundary (the high half goes to word 1)."""
    n = 4099
    got = aa.philox_bits(seed, offset, n, device).cpu().numpy().view(np.uint32)
    want = philox_ref(seed, np.arange(offset, offset + n, dtype=np.uint64))
    mism = np.flatnonzero((got != want).any(1))
    assert got.shape == (n, 4) and mism.size == 0, f"{mism.size}/{n} counters differ, first at {mism[:5]}"


@pytest.mark.parametrize("seed", [3, 0x0000000FCAFEB0BA], ids=hex)
@pytest.mark.parametrize("shape", [(3, 7, 13), (2, 8, 37)], ids=str)
def test_gumbel_noise_matches_numpy_transform(seed, shape, device):
    """Element (b, g, n) is word g % 4 of counter offset + (b ceil(G/4) + g // 4) N + n (the kernel's logical
    index, not tile coordinates), mapped by the NumPy transform."""
    offset = 1000
    got = aa.gumbel_noise(seed, offset, shape, device).cpu()
    assert got.dtype == torch.float32 and got.shape == shape
    want = torch.from_numpy(gumbel_stream_ref(seed, offset, shape))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # shifting the offset shifts every row's stream along the tokens
    shifted = aa.gumbel_noise(seed, offset + 5, shape, device).cpu()
    assert torch.equal(shifted[:, :, :-5], got[:, :, 5:])


def test_gumbel_noise_large_offset_uses_64bit_counters(device):
    """Counters past 2**31 (int64 in the kernels) and across 2**32 follow the same documented layout."""
    shape, offset = (2, 5, 11), 2**32 - 60
    got = aa.gumbel_noise(77, offset, shape, device).cpu()
    torch.testing.assert_close(got, torch.from_numpy(gumbel_stream_ref(77, offset, shape)), atol=1e-6, rtol=1e-6)


def test_gumbel_noise_independent_of_block_size(device):
    b, g, n = 2, 12, 37
    ref = aa.gumbel_noise(77, 0, (b, g, n), device)
    for bn, bg in ((16, 4), (32, 8), (64, 16)):
        out = torch.full((b, g, n), float("nan"), device=device)
        aa._gumbel_kernel[(math.ceil(n / bn), math.ceil(g / bg), b)](
            out, 77, 0, g, n, BLOCK_N=bn, BLOCK_G=bg, CTR64=False
        )
        assert torch.equal(out, ref)


def test_gumbel_cdf_ks_and_range(device):
    """100k draws: KS statistic vs F(x) = exp(-exp(-x)) below 0.01 (the 0.1% critical value is 0.0062); every
    value finite and inside the range u in [2^-24, 1 - 2^-24] allows. All four words are used: each group row
    (word g % 4) passes on its own."""
    n = 25_000
    x = aa.gumbel_noise(2024, 0, (1, 4, n), device).double().cpu()
    assert bool(x.isfinite().all())
    lo, hi = -math.log(-math.log(2.0**-24)), -math.log(-math.log(1 - 2.0**-24))
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5

    def ks(v: torch.Tensor) -> float:
        v = v.sort().values
        cdf = torch.exp(-torch.exp(-v))
        i = torch.arange(1, v.numel() + 1, dtype=torch.float64)
        return torch.maximum(i / v.numel() - cdf, cdf - (i - 1) / v.numel()).max().item()

    assert ks(x.flatten()) < 0.01, f"KS statistic {ks(x.flatten()):.4g}"
    for w in range(4):
        assert ks(x[0, w]) < 0.015, f"word {w}: KS statistic {ks(x[0, w]):.4g}"  # 0.1% critical value 0.0123
    assert abs(x.mean().item() - 0.5772156649) < 0.02  # Euler-Mascheroni
    # the four words of one counter are independent: correlation of neighbouring rows near 0 (|r| < 4 / sqrt(n))
    r = torch.corrcoef(x[0])
    assert (r - torch.eye(4, dtype=r.dtype)).abs().max() < 4 / math.sqrt(n)


def test_extreme_words_stay_finite():
    """The map's ends: words 0 and 0xFFFFFFFF give u = 2^-24 and 1 - 2^-24, finite noise (no clamp needed)."""
    x = gumbel_ref(np.array([0, 0x1FF, 0xFFFFFE00, 0xFFFFFFFF], dtype=np.uint32))
    assert np.isfinite(x).all()
    assert abs(x[0] - (-math.log(-math.log(2.0**-24)))) < 1e-5 and x[0] == x[1]
    assert abs(x[3] - (-math.log(-math.log(1 - 2.0**-24)))) < 1e-3 and x[2] == x[3]


def _chi2_sf_df4(x: float) -> float:
    """Survival function of chi-square with 4 degrees of freedom (closed form)."""
    return math.exp(-x / 2) * (1 + x / 2)


def test_gumbel_max_frequencies_match_softmax(device):
    """Gumbel-max trick through the fused forward: with logits lambda_g for every token, the per-group counts
    ``d`` over 4 x 4000 tokens follow softmax(lambda). Chi-square (df = 4), seed fixed, p > 1e-3; the same counts
    against softmax(1.25 lambda) must be rejected (the test has power)."""
    b, g, n, c = 4, 5, 4000, 16
    lam = torch.tensor([0.5, -0.3, 1.2, 0.0, -1.0], dtype=torch.float64)
    q = torch.zeros(b, g, c)
    q[:, :, 0] = lam.float()
    k = torch.zeros(b, n, c)
    k[:, :, 0] = 1.0
    q, k = q.to(device), k.to(device)
    _, d = aa._launch_fwd(q, k, k, None, 31337, 0, 1.0, True, aa.NOISE_PHILOX, 1.0, 1.0)
    counts = d.double().sum(0).cpu()
    assert counts.sum().item() == b * n

    def p_value(probs: torch.Tensor) -> float:
        expected = b * n * probs
        return _chi2_sf_df4(((counts - expected) ** 2 / expected).sum().item())

    assert p_value(torch.softmax(lam, 0)) > 1e-3
    assert p_value(torch.softmax(1.25 * lam, 0)) < 1e-3


def test_draw_seed_follows_manual_seed(device):
    torch.manual_seed(42)
    a = [aa.draw_seed(device) for _ in range(3)]
    torch.manual_seed(42)
    b = [aa.draw_seed(device) for _ in range(3)]
    assert a == b and len(set(a)) == 3
    assert all(0 <= s < 2**31 for s in a)


def test_same_seed_same_bits_new_call_new_noise(device):
    """Training mode: manual_seed reproduces output and grads bitwise; consecutive calls draw different noise."""
    (q, k, v), _ = OPS["assign_attention"].make_inputs(
        OPS["assign_attention"].case("g8-n37-c40"), torch.float32, device, 0
    )
    q.requires_grad_()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        out = aa.assign_attention(q, k, v, gumbel=True, tau=0.5)
        (dq,) = torch.autograd.grad(out.sum(), q)
        return out.detach(), dq

    torch.manual_seed(1)
    o1, g1 = run()
    o1b, _ = run()  # next call, new seed
    torch.manual_seed(1)
    o2, g2 = run()
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    assert not torch.equal(o1, o1b)
    eval_out = aa.assign_attention(q, k, v)
    assert not torch.equal(o1, eval_out)


def test_kernel_noise_equals_materialised_noise(device):
    """The forward's in-kernel noise is gumbel_noise(draw_seed(), 0, ...) under the same manual_seed (soft mode,
    so every noise value influences the output)."""
    (q, k, v), _ = OPS["assign_attention"].make_inputs(
        OPS["assign_attention"].case("odd-7x13x24"), torch.float32, device, 2
    )
    torch.manual_seed(8)
    got = aa.assign_attention(q, k, v, gumbel=True, hard=False, tau=0.3)
    torch.manual_seed(8)
    noise = aa.gumbel_noise(aa.draw_seed(device), 0, (3, 7, 13), device)
    want = R.assign_attention(q, k, v, gumbel=True, hard=False, tau=0.3, noise=noise)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    other = R.assign_attention(
        q, k, v, gumbel=True, hard=False, tau=0.3, noise=aa.gumbel_noise(9, 0, (3, 7, 13), device)
    )
    assert (other - want).abs().max() > 1e-2
