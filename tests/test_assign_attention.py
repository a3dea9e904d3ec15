"""Fused assignment attention (kernels/assign_attention.py) vs the eager spec (kernels/reference.py).

Tolerance rule (docs/kernels.md §6, tests/helpers.assert_parity): ``max|kernel - ref64| <= 2 max|eager - ref64| +
atol`` with the same inputs and the same noise. The hard argmax is discontinuous, so parity tests first check that
every token's top-2 logit margin (fp64) exceeds 1e-4; the near-tie test checks what happens below that.
RNG / Philox tests live in tests/test_philox.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kernels import assign_attention as aa
from kernels import reference as R
from kernels.registry import OPS
from kernels.tolerance import ARGMAX_MARGIN as MARGIN
from kernels.tolerance import top2_margin as _margin  # fp64 top-2 logit gap per token [B, N]
from tests.helpers import assert_close, assert_parity

SPEC = OPS["assign_attention"]


def _run(fn, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, **kw) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Output and (dq, dk, dv) of ``fn`` for upstream gradient ``dout``, on fresh leaf copies."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), grads


def _check_parity(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, **kw) -> None:
    """Kernel vs fp64 reference, tolerance from the same-dtype eager reference; output and all three grads."""
    if kw.get("hard", True):
        m = _margin(q, k, kw.get("noise"), kw.get("scale"))
        assert m.min() > MARGIN, f"test input has a near-tie (margin {m.min().item():.3g}); choose another seed"
    out_k, g_k = _run(aa.assign_attention, q, k, v, dout, **kw)
    out_e, g_e = _run(R.assign_attention, q, k, v, dout, **kw)
    out_r, g_r = _run(R.assign_attention, q.double(), k.double(), v.double(), dout.double(), **kw)
    assert out_k.dtype == q.dtype and out_k.shape == q.shape
    assert_parity(out_k, out_e, out_r, name="out")
    for name, a, e, r in zip(("dq", "dk", "dv"), g_k, g_e, g_r):
        assert a.dtype == q.dtype
        assert_parity(a, e, r, name=name)


def _mode_kwargs(mode: str, shape: tuple[int, int, int], device: torch.device) -> dict:
    if mode == "eval":
        return dict(hard=True)
    noise = aa.gumbel_noise(1234, 0, shape, device)  # the kernel's own noise stream, materialised
    if mode == "train":
        return dict(hard=True, gumbel=True, noise=noise, tau=0.5)
    assert mode == "soft"
    return dict(hard=False, gumbel=True, noise=noise, tau=2.0, eps=0.5, scale=0.3)


# ---- parity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", ["eval", "train", "soft"])
@pytest.mark.parametrize("case", SPEC.select("smoke"), ids=lambda c: c.name)
def test_smoke_parity(case, mode, dtype, device):
    (q, k, v), case_kw = SPEC.make_inputs(case, dtype, device, 3)
    d = case.dims
    kw = _mode_kwargs(mode, (d["B"], d["G"], d["N"]), device)
    kw.update(case_kw)  # e.g. hard=False for the soft case
    dout = torch.randn(d["B"], d["G"], d["C"], device=device)
    _check_parity(q, k, v, dout, **kw)


def test_soft_eps_zero_padded_groups_stay_clean(device):
    """eps = 0: padded group rows have 1/(0 + eps) = inf; they must not leak NaN into dk (G = 7 pads to 16)."""
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("odd-7x13x24"), torch.float32, device, 5)
    _check_parity(q, k, v, torch.randn_like(q), hard=False, eps=0.0)


def test_model_case_stage1_b2_training_noise(device):
    """Real stage-1 shape, training mode with in-kernel noise: ``gumbel_noise(draw_seed(), 0, ...)`` after the
    same ``torch.manual_seed`` reproduces it in the forward, and the backward regenerates the same noise (else
    the softmax inside the straight-through gradient would differ)."""
    case = SPEC.case("stage1-b2")
    (q, k, v), _ = SPEC.make_inputs(case, torch.float32, device, 1)
    b, g, n = case.dims["B"], case.dims["G"], case.dims["N"]
    dout = torch.randn_like(q)
    torch.manual_seed(123)
    out_k, g_k = _run(aa.assign_attention, q, k, v, dout, gumbel=True, tau=0.5)
    torch.manual_seed(123)
    noise = aa.gumbel_noise(aa.draw_seed(device), 0, (b, g, n), device)
    assert _margin(q, k, noise).min() > MARGIN
    kw = dict(gumbel=True, noise=noise, tau=0.5)
    out_e, g_e = _run(R.assign_attention, q, k, v, dout, **kw)
    out_r, g_r = _run(R.assign_attention, q.double(), k.double(), v.double(), dout.double(), **kw)
    assert_parity(out_k, out_e, out_r, name="out")
    for name, a, e, r in zip(("dq", "dk", "dv"), g_k, g_e, g_r):
        assert_parity(a, e, r, name=name)


def test_mixed_dtypes_promote(device):
    """q fp16 with fp32 k, v: computed in fp32 like the reference, returned in q's dtype."""
    q = torch.randn(2, 7, 24, device=device).half()
    k, v = torch.randn(2, 13, 24, device=device), torch.randn(2, 13, 24, device=device)
    out = aa.assign_attention(q, k, v)
    ref = R.assign_attention(q, k, v)
    assert out.dtype == torch.float16
    assert_close(out, ref, atol=1e-3)


def test_no_image_tokens(device):
    """N = 0: every group is empty, out = 0 / (0 + eps) = 0, dq = 0."""
    q = torch.randn(2, 7, 24, device=device, requires_grad=True)
    k, v = torch.randn(2, 0, 24, device=device), torch.randn(2, 0, 24, device=device)
    out = aa.assign_attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq, torch.zeros_like(dq))


# ---- hard argmax: exact ties and near-ties ----------------------------------------------------------------------


def test_exact_ties_pick_lowest_group(device):
    """Integer-valued inputs make the tied logits bitwise equal: all-equal rows -> group 0; rows 2 and 5 equal and
    dominant -> group 2."""
    g0 = torch.Generator(device="cpu").manual_seed(5)
    b, g, n, c = 2, 7, 13, 24
    k = torch.randint(1, 4, (b, n, c), generator=g0).float().to(device)  # positive entries
    v = torch.randn(b, n, c, generator=g0).to(device)
    q_eq = torch.randint(1, 4, (b, 1, c), generator=g0).float().expand(b, g, c).contiguous().to(device)
    out = aa.assign_attention(q_eq, k, v)
    expect = torch.zeros_like(out)
    expect[:, 0] = v.sum(1) / (n + 1.0)
    assert_close(out, expect, atol=1e-5, name="all tied")
    assert torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))

    q = -torch.randint(1, 4, (b, g, c), generator=g0).float()  # negative rows lose against positive k
    q[:, 5] = q[:, 2] = torch.randint(1, 4, (b, c), generator=g0).float()
    out = aa.assign_attention(q.to(device), k, v)
    expect = torch.zeros_like(out)
    expect[:, 2] = v.sum(1) / (n + 1.0)
    assert_close(out, expect, atol=1e-5, name="rows 2 and 5 tied")


def test_near_ties_disagree_only_below_margin(device):
    """Pairs of nearly equal group rows (gaps 1e-8 .. 1e-2) at the real stage-1 shape. With ``v_n = e_n`` the output
    reveals each token's group. Where the fp64 top-2 margin exceeds 1e-4 the kernel must agree with the fp64 argmax
    (>= 99.9%, in practice all); every disagreement must sit below that margin and pick a group that is within it."""
    gen = torch.Generator(device="cpu").manual_seed(11)
    b, g, n, c = 2, 64, 196, 384
    base = torch.randn(b, g // 2, c, generator=gen)
    gaps = torch.logspace(-8, -2, g // 2)[None, :, None]  # per pair, in logit units
    q = torch.stack([base, base + gaps * torch.randn(b, g // 2, c, generator=gen)], dim=2).reshape(b, g, c)
    k = torch.randn(b, n, c, generator=gen)
    v = torch.eye(n, c).expand(b, n, c).contiguous()
    q, k, v = q.to(device), k.to(device), v.to(device)
    out = aa.assign_attention(q, k, v)[:, :, :n]  # [B, G, N]: 1/(d_g+1) at the assigned group
    assert torch.equal((out > 0).sum(1), torch.ones(b, n, dtype=torch.long, device=device)), "not one-hot"
    got = out.argmax(1)  # [B, N]
    x = torch.matmul(q.double(), k.double().transpose(-1, -2)) * c**-0.5
    want = x.argmax(1)
    margin = _margin(q, k)
    clear = margin > MARGIN
    assert (~clear).sum() >= 10, "construction should produce near-ties"
    agree = got == want
    assert agree[clear].float().mean() >= 0.999
    bad = ~agree
    assert (margin[bad] <= MARGIN).all(), f"disagreements at margins {margin[bad].tolist()}"
    chosen = x.gather(1, got[:, None]).squeeze(1)
    assert (x.amax(1) - chosen <= MARGIN).all()


@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("mode", ["eval", "train", "soft"])
def test_nan_propagates_like_the_reference(where, mode, device):
    """Issue 14 item 6: a NaN in q (one group row) or k (one token) must not be hidden by the argmax. The reference
    turns every logit column holding a NaN into NaN (its softmax, hence ``one_hot - sg(Y) + Y``), so the output,
    dq, dk and dv are NaN exactly where the reference's are; everything else stays finite and matches."""
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("odd-7x13x24"), torch.float32, device, 3)
    if where == "q":
        q = q.clone()
        q[1, 2, 5] = float("nan")
    else:
        k = k.clone()
        k[2, 4, 0] = float("nan")
    kw = _mode_kwargs(mode, (3, 7, 13), device)
    dout = torch.randn_like(q)
    out_k, g_k = _run(aa.assign_attention, q, k, v, dout, **kw)
    out_e, g_e = _run(R.assign_attention, q, k, v, dout, **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out_k, *g_k), (out_e, *g_e)):
        assert bool(e.isnan().any()), f"{name}: the reference should produce NaN here"
        assert torch.equal(a.isnan(), e.isnan()), (
            f"{name}: NaN at {int(a.isnan().sum())} places, reference {int(e.isnan().sum())}"
        )
        ok = ~e.isnan()
        assert_close(a[ok], e[ok], atol=1e-4, rtol=1e-4, name=name)


# ---- gradients --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b, kw", [(1, dict()), (2, dict(gumbel=True, tau=0.7, eps=0.5, scale=0.4))], ids=["plain", "noise"]
)
def test_soft_gradcheck_fp64(b, kw, device):
    """Soft mode is smooth: finite differences in fp64 through the (interpreted) kernel. Full Jacobian at B = 1,
    gradcheck's fast mode (random projections) at B = 2 to keep the interpreter time down."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    g, n, c = 3, 5, 4
    q, k, v = (
        torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_()
        for s in ((b, g, c), (b, n, c), (b, n, c))
    )
    if kw.get("gumbel"):
        kw = dict(kw, noise=aa.gumbel_noise(7, 0, (b, g, n), device))
    assert torch.autograd.gradcheck(
        lambda q, k, v: aa.assign_attention(q, k, v, hard=False, **kw),
        (q, k, v),
        eps=1e-6,
        atol=1e-6,
        rtol=1e-4,
        fast_mode=b > 1,
    )


# ---- determinism, guards, block sizes ---------------------------------------------------------------------------


def test_eval_mode_deterministic_and_consumes_no_rng(device):
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("odd-7x13x24"), torch.float32, device, 0)
    state = torch.get_rng_state()
    a = aa.assign_attention(q, k, v)
    b = aa.assign_attention(q, k, v)
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state()), "eval mode must not draw a seed"


def _guarded(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pad: int = 257):
    """A NaN-filled buffer and a contiguous view into its middle: the kernel must fill the view and nothing else."""
    numel = math.prod(shape)
    buf = torch.full((pad + numel + pad,), float("nan"), dtype=dtype, device=device)
    return buf, buf[pad : pad + numel].view(shape)


def _assert_guarded(buf: Tensor, view: Tensor, name: str, pad: int = 257) -> None:
    assert bool(buf[:pad].isnan().all() and buf[-pad:].isnan().all()), f"{name}: write outside the output"
    assert bool(view.isfinite().all()), f"{name}: {int((~view.isfinite()).sum())} elements not written"


@pytest.mark.parametrize(
    "c, blocks",
    [
        (40, None),
        (40, dict(BLOCK_G=16, BLOCK_N=16, BLOCK_C=16, SPLITS=2)),
        (61, dict(BLOCK_N=16, BLOCK_C=16, SPLITS=3)),
        (61, dict(BLOCK_N=16, BLOCK_C=16, STREAMED=True)),
    ],
    ids=["default", "3-chunks-2-splits", "4-chunks-3-splits", "streamed-4-chunks"],
)
def test_poisoned_outputs_and_block_invariance(c, blocks, device):
    """Guard-filled outputs (forward and backward launchers, training mode with in-kernel noise); several token
    tiles, 3 or 4 unrolled channel chunks, partial tiles and token splits (partial sums reduced by the launcher)
    with small blocks. Results match the reference fed with ``gumbel_noise`` for the same seed, so the noise is
    independent of the tiling."""
    b, g, n = 2, 7, 37
    gen = torch.Generator(device="cpu").manual_seed(4)
    q, k, v = (torch.randn(*s, generator=gen).to(device) for s in ((b, g, c), (b, n, c), (b, n, c)))
    seed, tau, eps, scale = 987654, 0.5, 1.0, c**-0.5
    noise = aa.gumbel_noise(seed, 0, (b, g, n), device)
    assert _margin(q, k, noise).min() > MARGIN
    ob, out = _guarded((b, g, c), torch.float32, device)
    db, d = _guarded((b, g), torch.float32, device)
    aa._launch_fwd(q, k, v, None, seed, 0, tau, True, aa.NOISE_PHILOX, eps, scale, out=out, d=d, blocks=blocks)
    _assert_guarded(ob, out, "out")
    _assert_guarded(db, d, "d")
    assert torch.equal(d, d.round()) and torch.equal(d.sum(1), torch.full((b,), float(n), device=device))

    dout = torch.randn(b, g, c, generator=gen).to(device)
    ref_out, ref_g = _run(R.assign_attention, q, k, v, dout, gumbel=True, noise=noise, tau=tau)
    assert_close(out, ref_out, atol=1e-5, name="out")
    bufs = [_guarded(t.shape, torch.float32, device) for t in (q, k, v)]
    aa._launch_bwd(
        dout,
        q,
        k,
        v,
        out,
        d,
        None,
        seed,
        0,
        tau,
        True,
        aa.NOISE_PHILOX,
        eps,
        scale,
        grads=tuple(view for _, view in bufs),
        blocks=blocks,
    )
    for name, (buf, view), r in zip(("dq", "dk", "dv"), bufs, ref_g):
        _assert_guarded(buf, view, name)
        assert_close(view, r, atol=1e-5, rtol=1e-5, name=name)


def test_token_split_follows_the_noise_mode(device, monkeypatch):
    """The token split depends on the launch config, which depends on the noise mode (on a GPU an explicit noise
    tensor halves the backward's token tile, so small batches get two programs per image): the launcher must size
    its partial-sum buffers from the same config as the launch, else two programs write the output (or dq) of one
    image and half of its tokens are lost. Here the config splits tokens only with a noise tensor (forward and
    backward; the old launcher broke both)."""
    config = aa._config

    def noise_split(b, g, n, c, dtype, backward, num_sms=132, noise=0, arch=90):
        return {**config(b, g, n, c, dtype, backward, num_sms, noise, arch), "BLOCK_N": 16, "SPLITS": 1 + (noise == 2)}

    monkeypatch.setattr(aa, "_config", noise_split)
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("g8-n37-c40"), torch.float32, device, 4)
    noise = aa.gumbel_noise(77, 0, (1, 8, 37), device)
    dout = torch.randn_like(q)
    _check_parity(q, k, v, dout, gumbel=True, noise=noise, tau=0.5)


# ---- errors -----------------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


BAD_INPUTS = {
    "rank": (lambda: (_t(2, 8), _t(2, 5, 8), _t(2, 5, 8)), {}, ValueError, r"q \[B,G,C\].*\(2, 8\)"),
    "batch": (lambda: (_t(2, 4, 8), _t(3, 5, 8), _t(3, 5, 8)), {}, ValueError, r"\(2, 4, 8\).*\(3, 5, 8\)"),
    "channels": (lambda: (_t(2, 4, 8), _t(2, 5, 9), _t(2, 5, 9)), {}, ValueError, r"\(2, 5, 9\)"),
    "k-v": (lambda: (_t(2, 4, 8), _t(2, 5, 8), _t(2, 6, 8)), {}, ValueError, r"v \(2, 6, 8\)"),
    "too-many-groups": (lambda: (_t(1, 257, 8), _t(1, 5, 8), _t(1, 5, 8)), {}, ValueError, r"257.*maximum of 256"),
    "non-contiguous": (
        lambda: (_t(2, 4, 8), _t(2, 8, 5).transpose(1, 2), _t(2, 5, 8)),
        {},
        ValueError,
        r"k \(2, 5, 8\).*not contiguous.*contiguous\(\)",
    ),
    "int-dtype": (lambda: (_t(2, 4, 8).long(), _t(2, 5, 8), _t(2, 5, 8)), {}, TypeError, r"int64"),
    "noise-without-gumbel": (
        lambda: (_t(2, 4, 8), _t(2, 5, 8), _t(2, 5, 8)),
        dict(noise=_t(2, 4, 5)),
        ValueError,
        r"gumbel=False",
    ),
    "noise-shape": (
        lambda: (_t(2, 4, 8), _t(2, 5, 8), _t(2, 5, 8)),
        dict(gumbel=True, noise=_t(2, 5, 4)),
        ValueError,
        r"noise shape \(2, 5, 4\)",
    ),
    "tau": (lambda: (_t(2, 4, 8), _t(2, 5, 8), _t(2, 5, 8)), dict(tau=0.0), ValueError, r"tau"),
    "devices": (lambda: (_t(2, 4, 8), _t(2, 5, 8, device="meta"), _t(2, 5, 8)), {}, ValueError, r"one device"),
    "meta-device": (
        lambda: (_t(2, 4, 8, device="meta"), _t(2, 5, 8, device="meta"), _t(2, 5, 8, device="meta")),
        {},
        ValueError,
        r"unsupported device meta",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
    make, kw, exc, pattern = BAD_INPUTS[name]
    with pytest.raises(exc, match=pattern) as info:
        aa.assign_attention(*make(), **kw)
    assert "assign_attention" in str(info.value)


def test_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(aa, "INTERPRET", False)
    with pytest.raises(ValueError) as info:
        aa.assign_attention(_t(2, 4, 8), _t(2, 5, 8), _t(2, 5, 8))
    msg = str(info.value)
    for part in ("assign_attention", "(2, 4, 8)", "(2, 5, 8)", "CUDA", "TRITON_INTERPRET=1", "eager backend"):
        assert part in msg, f"{part!r} missing from: {msg}"


def test_gpu_shared_memory_limits_say_how_to_fix(monkeypatch):
    """On a GPU, fp64 (the exact gradcheck path) at stage 1 would need ~800 KB of resident q / dO: a clear error,
    never a launch failure. fp32 passes the check, backward included (its stage-1 backward is the streamed kernel)."""
    monkeypatch.setattr(aa, "INTERPRET", False)
    q = _t(1, 64, 384, dtype=torch.float64).requires_grad_()
    with pytest.raises(ValueError) as info:
        aa.assign_attention(q, _t(1, 9, 384, dtype=torch.float64), _t(1, 9, 384, dtype=torch.float64))
    msg = str(info.value)
    for part in ("assign_attention", "backward", "shared memory", "G = 64, C = 384", "eager backend"):
        assert part in msg, f"{part!r} missing from: {msg}"
    q32 = _t(1, 64, 384).requires_grad_()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):  # past the check: no GPU here
        aa.assign_attention(q32, _t(1, 9, 384), _t(1, 9, 384))


def test_streamed_backward_is_picked_where_the_resident_one_does_not_fit(monkeypatch):
    """GPU configs: the streamed backward for fp32 at stage 1 (both targets) and for 16-bit inputs at G = 64 on
    sm_80 only; the resident kernel everywhere else (compiled-code facts: docs/kernels.md §1.3)."""
    monkeypatch.setattr(aa, "INTERPRET", False)

    def streamed(g, dtype, arch, backward=True):
        return aa._config(256, g, 196, 384, dtype, backward, 132, aa.NOISE_PHILOX, arch).get("STREAMED", False)

    assert streamed(64, torch.float32, 90) and streamed(64, torch.float32, 80)
    assert streamed(64, torch.bfloat16, 80) and streamed(64, torch.float16, 80)
    assert not streamed(64, torch.bfloat16, 90) and not streamed(8, torch.bfloat16, 80)
    assert not streamed(8, torch.float32, 90) and not streamed(64, torch.float32, 90, backward=False)


@pytest.mark.parametrize("mode", ["eval", "train", "soft", "noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_backward_matches_the_resident_one(mode, dtype, device):
    """The streamed backward (one program per channel chunk, here 2 chunks of 16, the second partial) gives the
    resident kernel's gradients, in every noise mode (several token tiles: the streamed case of
    test_poisoned_outputs_and_block_invariance)."""
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("odd-7x13x24"), dtype, device, 8)
    b, g, n = 3, 7, 13
    hard, tau, eps = mode != "soft", 0.5, 1.0 if mode != "soft" else 0.5
    noise_mode = {"eval": aa.NOISE_OFF, "noise": aa.NOISE_TENSOR}.get(mode, aa.NOISE_PHILOX)
    noise = aa.gumbel_noise(5, 0, (b, g, n), device) if noise_mode == aa.NOISE_TENSOR else None
    if hard:
        philox = aa.gumbel_noise(99, 0, (b, g, n), device) if noise_mode == aa.NOISE_PHILOX else None
        assert _margin(q, k, noise if noise is not None else philox).min() > MARGIN
    scale = 24**-0.5
    out, d = aa._launch_fwd(q, k, v, noise, 99, 0, tau, hard, noise_mode, eps, scale)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    args = (dout, q, k, v, out, d, noise, 99, 0, tau, hard, noise_mode, eps, scale)
    want = aa._launch_bwd(*args)
    got = aa._launch_bwd(*args, blocks=dict(STREAMED=True, BLOCK_C=16, BLOCK_N=16))
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(a.float(), w.float(), atol=1e-5, rtol=1e-5, name=name)


# ---- integration: torch.compile and the ops switch --------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_matches_eager(device):
    """A compiled function around the op (custom ops, the seed draw included: run eagerly) gives the same
    output and gradients as eager under the same torch.manual_seed, training mode included."""
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("g8-n37-c40"), torch.float32, device, 0)

    def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return (aa.assign_attention(q * 1.5, k, v, gumbel=True, tau=0.5) ** 2).sum()

    dout = torch.ones((), device=device)
    compiled = torch.compile(f, fullgraph=False)
    torch.manual_seed(5)
    got, g_got = _run(lambda q, k, v: compiled(q, k, v), q, k, v, dout)
    torch.manual_seed(5)
    want, g_want = _run(f, q, k, v, dout)
    # inductor fuses square+sum (different rounding order); different noise would be off by O(1)
    assert_close(got, want, atol=0.0, rtol=1e-6, name="loss")
    for name, a, b in zip(("dq", "dk", "dv"), g_got, g_want):
        assert_close(a, b, atol=1e-6, rtol=1e-6, name=name)


@pytest.mark.parametrize("gumbel", [True, False], ids=["train", "eval"])
def test_traced_by_dynamo_without_graph_breaks(gumbel, device):
    """The whole op (validation, the seed draw, forward and backward custom ops) is one graph for torch.compile:
    ``torch._dynamo.explain`` finds no break (backend "eager": no inductor cost on CPU). A compiled-with-fullgraph
    call then gives eager's output and gradients for the same torch.manual_seed: the seed is the same draw."""
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("odd-7x13x24"), torch.float32, device, 2)

    def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return aa.assign_attention(q * 1.5, k, v, gumbel=gumbel, tau=0.5)

    torch._dynamo.reset()
    q_ = q.detach().clone().requires_grad_()
    ex = torch._dynamo.explain(f)(q_, k, v)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason)[:300] for r in ex.break_reasons]
    dout = torch.randn_like(q)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.manual_seed(11)
    got, g_got = _run(compiled, q, k, v, dout)
    torch.manual_seed(11)
    want, g_want = _run(f, q, k, v, dout)
    torch.manual_seed(11)
    other, _ = _run(f, q, k, v, dout)
    assert torch.equal(got, want) and torch.equal(other, want)
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)
    if gumbel:  # the test can fail: a different seed gives different noise, and so a different output
        torch.manual_seed(12)
        assert not torch.equal(f(q, k, v), want)


def test_compiled_graph_keeps_every_seed_draw(device):
    """Two training-mode calls on the very same inputs in one compiled graph draw two seeds, as eager does (AOT
    autograd's common-subexpression elimination merged them while the draw was a pure op of q)."""
    (q, k, v), _ = SPEC.make_inputs(SPEC.case("odd-7x13x24"), torch.float32, device, 3)

    def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        a = aa.assign_attention(q, k, v, gumbel=True, hard=False, tau=0.5)
        return a - aa.assign_attention(q, k, v, gumbel=True, hard=False, tau=0.5)

    torch._dynamo.reset()
    torch.manual_seed(4)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q.requires_grad_(), k, v)
    torch.manual_seed(4)
    want = f(q, k, v)
    assert want.abs().max() > 0.1 and torch.equal(got, want)


def test_ops_switch_kernel_noise_parity(device):
    """groupvit.ops relies on draw_seed/gumbel_noise: eager with kernel noise == triton, same manual_seed."""
    from groupvit import ops

    (q, k, v), _ = SPEC.make_inputs(SPEC.case("odd-7x13x24"), torch.float32, device, 6)
    torch.manual_seed(9)
    assert _margin(q, k, aa.gumbel_noise(aa.draw_seed(device), 0, (3, 7, 13), device)).min() > MARGIN
    with ops.use_backend("triton"):
        torch.manual_seed(9)
        got = ops.assign_attention(q, k, v, gumbel=True, tau=0.5)
    with ops.use_backend("eager"), ops.use_kernel_noise():
        torch.manual_seed(9)
        want = ops.assign_attention(q, k, v, gumbel=True, tau=0.5)
    assert_close(got, want, atol=1e-5)


_SM90_BUILD = """
import torch
import kernels.assign_attention as aa
from kernels.variants import compile_variant
assert not aa.INTERPRET
for dims, dtype, mode in ((dict(B=256, G=64, N=196, C=384), torch.bfloat16, "train"),
                          (dict(B=4, G=8, N=64, C=384), torch.float32, "soft")):
    for v in aa.variants(dims, dtype):
        if v.meta["mode"] == mode and v.dtype in ("bf16", "fp32-tf32"):
            k, _ = compile_variant(v, 90)
            assert len(k.asm["cubin"]) > 0
print("ok")
"""


@pytest.mark.slow
def test_gpu_build_compiles_for_sm90(tmp_path):
    """The interpreter accepts things the NVIDIA backend rejects (tl.dot with K < 16, ...): compile the forward and
    backward with the GPU launch configs (stage 1 bf16 hard; fp32 soft at B = 4, where tokens are split across
    programs) to sm_90 cubins, no GPU needed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton wheel without the NVIDIA backend's ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-c", _SM90_BUILD], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ---- GPU only ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case_name", ["stage1", "stage2"])
def test_gpu_bf16_parity_real_shapes(case_name, mode):
    """bf16 at B = 256 (64x196x384 and 8x64x384). Images with a top-2 margin below 1e-4 anywhere are left out
    (bf16 dot rounding may legitimately flip those argmaxes); at least 90% of the images are compared."""
    dev = torch.device("cuda")
    case = SPEC.case(case_name)
    (q, k, v), _ = SPEC.make_inputs(case, torch.bfloat16, dev, 0)
    d = case.dims
    kw = _mode_kwargs(mode, (d["B"], d["G"], d["N"]), dev)
    dout = torch.randn(d["B"], d["G"], d["C"], device=dev).bfloat16()
    keep = _margin(q, k, kw.get("noise")).amin(1) > MARGIN  # [B]
    assert keep.float().mean() >= 0.9
    out_k, g_k = _run(aa.assign_attention, q, k, v, dout, **kw)
    out_e, g_e = _run(R.assign_attention, q, k, v, dout, **kw)
    out_r, g_r = _run(R.assign_attention, q.double(), k.double(), v.double(), dout.double(), **kw)
    assert_parity(out_k[keep], out_e[keep], out_r[keep], name="out")
    for name, a, e, r in zip(("dq", "dk", "dv"), g_k, g_e, g_r):
        assert_parity(a[keep], e[keep], r[keep], name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("case_name", ["stage1", "stage2"])
def test_gpu_repeated_runs_bitwise_identical(case_name):
    """Race test: no atomics, so 20 runs (training mode, same seed) give bitwise-identical outputs and grads."""
    dev = torch.device("cuda")
    (q, k, v), _ = SPEC.make_inputs(SPEC.case(case_name), torch.bfloat16, dev, 0)
    dout = torch.randn_like(q)
    first = None
    for _ in range(20):
        torch.manual_seed(7)
        out, grads = _run(aa.assign_attention, q, k, v, dout, gumbel=True)
        res = (out, *grads)
        if first is None:
            first = res
        for a, b in zip(res, first):
            assert torch.equal(a, b)
