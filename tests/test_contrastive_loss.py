"""Fused contrastive loss (kernels/contrastive_loss.py) against the eager spec (kernels/reference.py).

CPU: Triton interpreter, fp32 parity on the registry's smoke cases (tolerance rule of tests/helpers.py against an
fp64 reference), fp64 gradcheck incl. the logit scale and its clamp, extreme logits, guard-filled buffers,
determinism, bad inputs, a 2-process gloo run and torch.compile. GPU (``-m gpu``): bf16 / fp32 (tf32, ieee) parity at
B = 4096 and 32768 against a chunked fp64 oracle (itself checked against the reference here on CPU), memory and
repeatability.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import reference
from kernels.registry import OPS
from tests.helpers import assert_close, assert_parity

cl = pytest.importorskip("kernels.contrastive_loss")  # needs triton (interpreter on CPU)

OP = OPS["contrastive_loss"]
SMOKE = [c.name for c in OP.select("smoke")]


def _run(fn, img: Tensor, txt: Tensor, theta: Tensor, *, g: float = 1.7, **kw) -> tuple[Tensor, ...]:
    """Loss and the gradients of ``g * loss`` w.r.t. (image, text, theta)."""
    xs = [t.detach().clone().requires_grad_(True) for t in (img, txt, theta)]
    loss = fn(*xs, **kw)
    (g * loss).backward()
    return (loss.detach(), *(x.grad for x in xs))


def _inputs(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 1):
    (img, txt, theta), kw = OP.make_inputs(OP.case(name), dtype, torch.device(device), seed)
    return img, txt, theta, kw


NAMES = ("loss", "d_image", "d_text", "d_theta")


# ---- parity on the registry's smoke cases ---------------------------------------------------------------------


@pytest.mark.parametrize("case", SMOKE)
def test_parity_fp32(case, device):
    img, txt, theta, kw = _inputs(case, device=device)
    out = _run(cl.contrastive_loss, img, txt, theta, **kw)
    eager = _run(reference.contrastive_loss, img, txt, theta, **kw)
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), **kw)
    assert out[0].dtype == torch.float32 and out[0].shape == ()
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert o.dtype == e.dtype, name
        assert_parity(o, e, r, name=f"{case} {name}")
    if "clamp" in case:  # exp(4.7) > 100: the clamp blocks theta's gradient
        assert out[3].item() == 0.0
    else:
        assert out[3].abs().item() > 1e-4  # the logit scale does get a gradient


def test_parity_fp16(device):
    img, txt, theta, kw = _inputs("b67-d40-k3", torch.float16, device)
    out = _run(cl.contrastive_loss, img, txt, theta, **kw)
    eager = _run(reference.contrastive_loss, img, txt, theta, **kw)
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), **kw)
    assert out[1].dtype == out[2].dtype == torch.float16
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert_parity(o, e, r, name=f"fp16 {name}")


@pytest.mark.interpreter
def test_parity_bf16_upcast_path():
    """bf16 loads are upcast in-kernel under the interpreter (GPU: native bf16 dots, see the GPU tests)."""
    img, txt, theta, kw = _inputs("b67-d40-k3", torch.bfloat16)
    out = _run(cl.contrastive_loss, img, txt, theta, **kw)
    eager = _run(reference.contrastive_loss, img, txt, theta, **kw)
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), **kw)
    assert out[1].dtype == out[2].dtype == torch.bfloat16 and out[0].dtype == torch.float32
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert_parity(o, e, r, atol=1e-5, name=f"bf16 {name}")  # default bf16 atol (1e-2) would exceed the grads


def test_triton_backend_through_ops_switch(device):
    from groupvit import ops

    img, txt, theta, kw = _inputs("b67-d40-k3", device=device)
    with ops.use_backend("triton"):
        out = _run(ops.contrastive_loss, img, txt, theta, **kw)
    direct = _run(cl.contrastive_loss, img, txt, theta, **kw)
    for name, o, d in zip(NAMES, out, direct):
        assert torch.equal(o, d), name


# ---- gradcheck, clamp, extreme logits -------------------------------------------------------------------------


@pytest.mark.parametrize("theta,k", [(1.0, 2), (4.7, 1)])
def test_gradcheck_fp64(theta, k, device):
    g = torch.Generator().manual_seed(3)
    b, d = 3, 16
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(device).requires_grad_(True)
    txt = F.normalize(torch.randn(b * k, d, generator=g, dtype=torch.float64), dim=-1).to(device).requires_grad_(True)
    th = torch.tensor(theta, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: cl.contrastive_loss(i, t, s, num_prompts=k), (img, txt, th))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("theta", [math.log(100.0), 5.5])
def test_clamp_boundary_matches_reference(dtype, theta, device):
    img, txt, _, kw = _inputs("b5-d16", dtype, device)
    th = torch.tensor(theta, dtype=dtype, device=device)
    assert reference.clamped_scale(th).item() == 100.0  # scale exactly at the cap (log 100) and above it
    out = _run(cl.contrastive_loss, img, txt, th, **kw)
    ref = _run(reference.contrastive_loss, img, txt, th, **kw)
    assert out[3].item() == ref[3].item() == 0.0
    for name, o, r in zip(NAMES[:3], out, ref):
        assert_close(o, r, atol=1e-5 if dtype == torch.float32 else 1e-12, name=name)


def test_extreme_logits_identical_features(device):
    """Scale 100 and identical features: every logit is 100, so the loss is 0.5*(log M + log B) exactly."""
    b, k, d = 70, 3, 16
    v = F.normalize(torch.randn(1, d), dim=-1).to(device)
    img, txt = v.expand(b, d).contiguous(), v.expand(b * k, d).contiguous()
    theta = torch.tensor(4.7, device=device)
    out = _run(cl.contrastive_loss, img, txt, theta, num_prompts=k)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    assert abs(out[0].item() - 0.5 * (math.log(b * k) + math.log(b))) < 1e-4
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), num_prompts=k)
    eager = _run(reference.contrastive_loss, img, txt, theta, num_prompts=k)
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert_parity(o, e, r, name=name)


def test_extreme_logits_large_norm(device):
    """Unnormalised features (logits up to ~3000): a running max is required, a fixed shift would overflow."""
    img, txt, theta, kw = _inputs("b100-d16", device=device)
    img, txt = img * 30.0, txt * 0.9 + 0.1  # some rows far more peaked than others
    out = _run(cl.contrastive_loss, img, txt, theta, **kw)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    eager = _run(reference.contrastive_loss, img, txt, theta, **kw)
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), **kw)
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert_parity(o, e, r, name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("flip", ["images", "texts"])
def test_anchor_window_fallbacks(monkeypatch, flip):
    """Scale 100 and two features of one side (17 and 30) pointing away from every feature of the other (cosines
    about -0.99): their LSEs lie far below the forward's fixed anchor (``_ANCHOR``), so the ``FIX_ROWS`` launch
    (flipped images: their rows) or the in-tile column fallback (flipped texts: their columns, in every image tile)
    must recompute them exactly; everything else stays on the anchored path. 16-row tiles: three row tiles, merged
    into one row of column partials (``GROUP``)."""
    monkeypatch.setattr(cl, "_INTERP_BLOCK", 16)
    g = torch.Generator().manual_seed(5)
    b, d = 40, 16
    u = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    sign = torch.ones(b, 1, dtype=torch.float64)
    far_idx = [17, 30]
    sign[far_idx] = -1.0
    s_img, s_txt = (sign, 1.0) if flip == "images" else (1.0, sign)
    img = F.normalize(s_img * u + 0.02 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).float()
    txt = F.normalize(s_txt * u + 0.02 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).float()
    theta = torch.tensor(math.log(100.0))  # anchor 100 log2(e) - 100 = 44.3; flipped logits about -143 (base 2)
    cos = img.double() @ txt.double().T
    far = cos[far_idx] if flip == "images" else cos[:, far_idx]
    assert far.max() < -0.9 and cos.max().item() > 0.9
    out = _run(cl.contrastive_loss, img, txt, theta)
    eager = _run(reference.contrastive_loss, img, txt, theta)
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double())
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert_parity(o, e, r, name=f"{flip} flipped: {name}")


@pytest.mark.interpreter
@pytest.mark.parametrize("group", [None, 2])
@pytest.mark.parametrize("case", ["b67-d40-k3", "b100-d16"])
def test_small_tiles_cover_every_loop(monkeypatch, case, group):
    """16-wide tiles: full tiles before and after the positive ones, several positive tiles, ragged last tiles and
    more column splits than one, in all three kernels (the fast paths skip masks and positives); the forward's
    row tiles merged into one row of column partials (default ``GROUP``) or into groups of two (several groups,
    the last one short)."""
    monkeypatch.setattr(cl, "_INTERP_BLOCK", 16)
    if group:
        monkeypatch.setattr(cl, "_fwd_group", lambda block_m: group)
    img, txt, theta, kw = _inputs(case)
    out = _run(cl.contrastive_loss, img, txt, theta, **kw)
    eager = _run(reference.contrastive_loss, img, txt, theta, **kw)
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), **kw)
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert_parity(o, e, r, name=f"{case} 16x16 group {group} {name}")


# ---- buffers, determinism --------------------------------------------------------------------------------------


def test_guard_filled_buffers(monkeypatch, device):
    """Every intermediate buffer starts as NaN: an element the kernels forget to write poisons the result."""
    img, txt, theta, kw = _inputs("b67-d40-k3", device=device)
    ref = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), **kw)
    eager = _run(reference.contrastive_loss, img, txt, theta, **kw)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(cl.torch, "empty", poisoned)
    out = _run(cl.contrastive_loss, img, txt, theta, **kw)
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert_parity(o, e, r, name=name)


def test_deterministic(device):
    img, txt, theta, kw = _inputs("b67-d40-k3", device=device)
    a = _run(cl.contrastive_loss, img, txt, theta, **kw)
    b = _run(cl.contrastive_loss, img, txt, theta, **kw)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


# ---- bad inputs -------------------------------------------------------------------------------------------------


def _good(device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(0)
    return tuple(
        t.to(device) for t in (torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g), torch.tensor(1.0))
    )


def _nan_at(t: Tensor, value: float) -> Tensor:
    t = t.clone()
    t.view(-1)[3] = value
    return t


BAD = {
    "mismatched D": (lambda i, t, s: (i, t[:, :12], s), {"num_prompts": 2}, ValueError, "embedding dims differ"),
    "text rows != B*K": (lambda i, t, s: (i, t[:7], s), {"num_prompts": 2}, ValueError, "text rows 7"),
    "K mismatch": (lambda i, t, s: (i, t, s), {"num_prompts": 3}, ValueError, "B*K"),
    "empty batch": (lambda i, t, s: (i[:0], t[:0], s), {"num_prompts": 2}, ValueError, "empty batch"),
    "1-d image": (lambda i, t, s: (i[0], t, s), {"num_prompts": 2}, ValueError, "expected image [B,D]"),
    "non-scalar scale": (lambda i, t, s: (i, t, s.new_ones(2)), {"num_prompts": 2}, ValueError, "scalar"),
    "NaN image": (lambda i, t, s: (_nan_at(i, float("nan")), t, s), {"num_prompts": 2}, ValueError, "in image"),
    "Inf text": (lambda i, t, s: (i, _nan_at(t, float("inf")), s), {"num_prompts": 2}, ValueError, "in text"),
    "NaN theta": (lambda i, t, s: (i, t, torch.tensor(float("nan"))), {"num_prompts": 2}, ValueError, "logit scale"),
    "int features": (lambda i, t, s: (i.long(), t.long(), s), {"num_prompts": 2}, TypeError, "floating-point"),
    "D too large": (
        lambda i, t, s: (i.new_ones(4, 600), t.new_ones(8, 600), s),
        {"num_prompts": 2},
        ValueError,
        "embedding dim 600",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs(name, device):
    make, kw, exc, msg = BAD[name]
    with pytest.raises(exc, match="contrastive_loss") as info:
        cl.contrastive_loss(*make(*_good(device)), **kw)
    assert msg in str(info.value)


def test_check_finite_can_be_disabled(device):
    img, txt, theta = _good(device)
    cl.set_check_finite(False)
    try:
        loss = cl.contrastive_loss(_nan_at(img, float("nan")), txt, theta, num_prompts=2)
    finally:
        cl.set_check_finite(True)
    assert loss.isnan()


def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(cl, "INTERPRET", False)
    with pytest.raises(ValueError, match="use CUDA tensors or select the eager backend"):
        cl.contrastive_loss(*_good(), num_prompts=2)


# ---- distributed (2 gloo processes) -----------------------------------------------------------------------------

DIST_CASES = [
    dict(name="k3", B=5, D=16, K=3, theta=2.6592, dtype=torch.float64, seed=11),
    dict(name="k1-clamp", B=3, D=16, K=1, theta=4.7, dtype=torch.float64, seed=12),
    dict(name="k1-fp32", B=6, D=24, K=1, theta=2.0, dtype=torch.float32, seed=13),
]


@pytest.mark.interpreter  # gloo moves CPU tensors: the kernels run under the interpreter in the workers
def test_distributed_gloo_two_ranks(tmp_path):
    """Rank r's loss is its local-row loss L_r of the global problem, so with W ranks:

    * ``mean_r L_r = L`` (the single-process loss on the concatenated batch): both averages run over the same
      image rows and the same text rows of the same global matrix;
    * backward of every rank's own L_r sums through the differentiable gather, giving rank r's features
      ``d(sum_q L_q)/dx_r = W * dL/dx_r`` -- the matching slice of the single-process gradient times W;
    * theta is replicated: rank r gets ``dL_r/dtheta`` only, so ``sum_r dtheta_r = W * dL/dtheta``.

    Asserted for the reference and the kernel; and with upstream gradients ``r + 1`` the kernel must still equal the
    reference rank by rank (the column terms of other ranks' losses carry their upstream gradients).
    """
    import torch.multiprocessing as mp

    from tests.dist_contrastive_worker import global_inputs, run

    world = 2
    mp.spawn(run, args=(world, str(tmp_path / "init"), str(tmp_path), DIST_CASES), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for c in DIST_CASES:
        img, txt, theta = global_inputs(c["B"], c["D"], c["K"], world, c["theta"], c["dtype"], c["seed"])
        b, bk = c["B"], c["B"] * c["K"]
        single = _run(reference.contrastive_loss, img.double(), txt.double(), theta.double(), g=1.0, num_prompts=c["K"])
        atol = 1e-10 if c["dtype"] == torch.float64 else 2e-5
        for impl in ("reference", "kernel"):
            ones = [res[r][(c["name"], impl, "ones")] for r in range(world)]
            tag = f"{c['name']} {impl}"
            assert_close(torch.stack([o[0] for o in ones]).mean(), single[0], atol=atol, name=f"{tag} loss")
            for r in range(world):
                assert_close(ones[r][1], world * single[1][r * b : (r + 1) * b], atol=atol, name=f"{tag} d_image")
                assert_close(ones[r][2], world * single[2][r * bk : (r + 1) * bk], atol=atol, name=f"{tag} d_text")
            assert_close(ones[0][3] + ones[1][3], world * single[3], atol=atol, name=f"{tag} d_theta")
        for weighting in ("ones", "ranked"):
            for r in range(world):
                k_out, r_out = res[r][(c["name"], "kernel", weighting)], res[r][(c["name"], "reference", weighting)]
                for name, o, e in zip(NAMES, k_out, r_out):
                    assert o.dtype == e.dtype, name
                    assert_close(o, e, atol=atol, name=f"{c['name']} {weighting} rank {r} {name}")
        if c["name"] == "k1-clamp":
            assert all(res[r][(c["name"], "kernel", "ones")][3].item() == 0.0 for r in range(world))
    assert "in image" in res[1]["nonfinite"]
    assert "another rank" in res[0]["nonfinite"]


# ---- torch.compile ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile(device):
    img, txt, theta, kw = _inputs("b67-d40-k3", device=device)

    @torch.compile(fullgraph=True)
    def f(i, t, s):
        return cl.contrastive_loss(i, t, s, **kw) * 2.0

    out = _run(f, img, txt, theta)
    direct = _run(lambda i, t, s: cl.contrastive_loss(i, t, s, **kw) * 2.0, img, txt, theta)
    for name, o, d in zip(NAMES, out, direct):
        assert_close(o, d, atol=1e-6, name=name)


# ---- GPU lowering without a GPU: tests/test_kernel_report.py compiles the kernels for sm_90a (the CI gate) ------


# ---- GPU: large-batch parity against a chunked fp64 oracle ------------------------------------------------------


chunked_oracle = reference.contrastive_loss_chunked  # the large-batch oracle (kernels/reference.py)


@pytest.mark.parametrize("case", ["b67-d40-k3", "b100-d16", "b67-d16-clamp"])
def test_chunked_oracle_matches_reference(case):
    img, txt, theta, kw = _inputs(case, torch.float64)
    ref = _run(reference.contrastive_loss, img, txt, theta, g=1.0, **kw)
    got = chunked_oracle(img, txt, theta, kw["num_prompts"], torch.float64, chunk=29)
    for name, o, r in zip(NAMES, got, ref):
        assert_close(o.to(r.dtype), r, atol=1e-12, name=name)  # theta is fp32 here: its grad comes back in fp32


GPU_MODES = {  # input dtype, fp32 matmul precision, atol as a fraction of max|fp64 value|
    "bf16": (torch.bfloat16, "highest", 2e-2),
    "fp32-tf32": (torch.float32, "high", 5e-3),
    "fp32-highest": (torch.float32, "highest", 5e-3),  # fp32 dots are tf32 whatever the precision setting
}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(GPU_MODES))
@pytest.mark.parametrize("b,k", [(4096, 1), (4096, 3), (32768, 1), (32768, 3)])
def test_gpu_parity_large(mode, b, k):
    dtype, precision, rel = GPU_MODES[mode]
    (img, txt, theta), kw = OP.make_inputs(OP.case(f"b{b}-k{k}"), dtype, torch.device("cuda"), 5)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        out = _run(cl.contrastive_loss, img, txt, theta, g=1.0, **kw)
        eager = chunked_oracle(img, txt, theta, k, torch.float32)  # eager fp32 math at the same precision setting
    finally:
        torch.set_float32_matmul_precision(prev)
    ref = chunked_oracle(img, txt, theta, k, torch.float64)
    eager = (eager[0], eager[1].to(dtype), eager[2].to(dtype), eager[3])  # the reference returns input-dtype grads
    for name, o, e, r in zip(NAMES, out, eager, ref):
        assert bool(torch.isfinite(o).all()), name
        atol = rel * max(r.abs().max().item(), 1.0 if name == "loss" else 0.0)
        assert_parity(o.float(), e.float(), r, atol=atol, name=f"{mode} b{b} k{k} {name}")


@pytest.mark.gpu
def test_gpu_refuses_fp64():
    img, txt, theta = (t.cuda() for t in _good())
    with pytest.raises(ValueError, match="interpreter only"):
        cl.contrastive_loss(img.double(), txt.double(), theta, num_prompts=2)


@pytest.mark.gpu
def test_gpu_memory_and_repeatability():
    """Loss memory (peak over inputs, including the two input gradients) < 0.1 GB at B = 32768 bf16, and reruns
    are bitwise equal (no atomics, fixed tiling after autotuning)."""
    (img, txt, theta), kw = OP.make_inputs(OP.case("b32768-k1"), torch.bfloat16, torch.device("cuda"), 0)
    first = _run(cl.contrastive_loss, img, txt, theta, **kw)  # also autotunes
    xs = [t.detach().clone().requires_grad_(True) for t in (img, txt, theta)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cl.contrastive_loss(*xs, **kw).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.1e9, f"loss memory {peak / 1e9:.3f} GB"
    for _ in range(5):
        rerun = _run(cl.contrastive_loss, img, txt, theta, **kw)
        for name, x, y in zip(NAMES, first, rerun):
            assert torch.equal(x, y), name
