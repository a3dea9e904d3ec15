"""The training step at speed: exact text trimming (outputs unchanged, text FLOPs down), at most one host read per
step, non-finite steps skipped alike on both backends, ``compile=true`` equal to eager, the CPU thread default."""

from __future__ import annotations

import dataclasses
import math
import os
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import groupvit
from groupvit import ops
from groupvit.config import get_config
from groupvit.tokenizer import tokenize
from train.loop import NonFiniteLossError, compile_forward_loss, train_step
from train.optim import build_optimizer

# Captions in the style of Conceptual Captions (hypernymised web alt-text), written for this test.
GCC_LIKE = [
    "actor attends the premiere of the film",
    "a man rides a bicycle along a dirt road in the countryside",
    "person, a student at university, poses for a portrait in the library",
    "the view from the top of the mountain",
    "illustration of a cartoon dog holding a red balloon",
    "football player celebrates scoring his side's second goal during the match between football teams",
    "beautiful young woman with long hair sitting on the beach at sunset and looking at the sea",
    "christmas tree decorated with lights and ornaments in the living room",
    "vector illustration of a set of icons for business",
    "a bowl of soup",
    "aerial view of the city at night with the river and the bridges lit up",
    "children play in the fountain on a hot summer day in the park",
    "the kitchen has been fitted with white cabinets, a wooden worktop and a large island with bar stools",
    "cat sleeping",
    "politician speaks to the media outside the building after the meeting on thursday",
    "portrait of a smiling senior man wearing glasses and a hat",
]
TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a close-up photo of a {}.",
    "itap of a {}.",
    "a black and white photo of the {}.",
    "a photo of the large {}.",
    "art of the {}.",
    "a {} in a video game.",
]
NOUNS = [
    "man",
    "road",
    "portrait",
    "library",
    "dog",
    "balloon",
    "player",
    "goal",
    "woman",
    "beach",
    "tree",
    "city",
    "fountain",
    "kitchen",
    "cabinets",
    "cat",
    "politician",
    "glasses",
    "hat",
    "soup",
]


def _texts(captions: list[str], k: int, ctx: int, seed: int = 0) -> torch.Tensor:
    """``[B, 1+K, ctx]``: each caption followed by K template prompts of nouns (as train.prompts makes them)."""
    rng = random.Random(seed)
    rows = []
    for cap in captions:
        rows += [cap] + [rng.choice(TEMPLATES).format(rng.choice(NOUNS)) for _ in range(k)]
    return tokenize(rows, ctx).view(len(captions), 1 + k, ctx)


def _demo_texts(n: int, ctx: int = 77) -> torch.Tensor:
    """The demo's generated captions with K=3 template prompts of their nouns."""
    from train.synthetic import generate

    caps = [c for _, c, _ in generate(n, seed=3, size=32)]
    return _texts(caps, 3, ctx, seed=1)


def _untrimmed(model: groupvit.GroupViT) -> groupvit.GroupViT:
    """The same weights with trimming off (text.trim_multiple = 0)."""
    off = groupvit.GroupViT(dataclasses.replace(model.cfg, text=dataclasses.replace(model.cfg.text, trim_multiple=0)))
    off.load_state_dict(model.state_dict())
    return off.train(model.training)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# ---- exact trimming -------------------------------------------------------------------------------------------------


def test_trimmed_text_embeddings_equal_untrimmed():
    torch.manual_seed(0)
    model = groupvit.create_model("groupvit-tiny", **{"text.context_length": 77}).eval()
    off = _untrimmed(model)
    full = "a " + " ".join(["very"] * 80) + " long caption"  # fills all 77 tokens (EOT at 76)
    cases = {
        "captions": tokenize(GCC_LIKE, 77),
        "prompts": _texts(GCC_LIKE[:4], 3, 77)[:, 1:].reshape(-1, 77),
        "one full caption": tokenize(GCC_LIKE[:5] + [full], 77),
        "demo": _demo_texts(6).reshape(-1, 77),
    }
    assert int(cases["one full caption"][-1].argmax()) == 76
    plan = model.text_encoder.plan(cases["captions"])
    assert len(plan.groups) >= 2 and all(length % 16 == 0 for _, _, length in plan.groups)  # really trimmed
    with torch.no_grad():
        for name, tok in cases.items():
            assert _rel(model.encode_text(tok), off.encode_text(tok)) <= 1e-6, name
    # lengths run: bucketed, never beyond the EOT's bucket, never the full 77 unless a sequence needs it
    lengths = sorted(length for _, _, length in model.text_encoder.plan(cases["one full caption"]).groups)
    assert lengths[-1] == 77 and lengths[0] <= 16


@pytest.mark.interpreter
def test_trimmed_training_forward_equal_untrimmed_under_triton():
    """The whole training forward + both fused losses + gradients, trimmed vs untrimmed, with the triton kernels."""
    torch.manual_seed(0)
    model = groupvit.create_model("groupvit-tiny", **{"text.context_length": 77}).eval()
    off = _untrimmed(model)
    images = torch.randn(4, 3, 32, 32)
    texts = _texts(GCC_LIKE[4:8], 3, 77)
    assert len(model.plan_text(texts).groups) >= 2
    results = []
    with ops.use_backend("triton"):
        for m in (model, off):
            out = m(images, texts, text_plan=m.plan_text(texts))
            loss = groupvit.GroupViTLoss()(out)["loss"]
            loss.backward()
            results.append((out.text_embeds, out.prompt_embeds, loss, m.text_encoder.token_embedding.weight.grad))
    for a, b in zip(*results):
        assert _rel(a, b) <= 1e-6


def test_text_plan_errors():
    model = groupvit.create_model("groupvit-tiny")
    tok = tokenize(["a red circle"], 16)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49408\)"):
        model.text_encoder.plan(tok + 49408)
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        model.text_encoder.plan(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="plan covers 1 rows"):
        model.text_encoder(tok.repeat(2, 1), model.text_encoder.plan(tok))


def _text_flops(texts: torch.Tensor, trim_multiple: int) -> float:
    """Counted FLOPs (FlopCounterMode) of groupvit-s's text tower on ``texts``, run on the meta device (shapes only;
    the plan is made from the real tokens). One layer: every layer costs the same, so the ratio is the tower's."""
    cfg = get_config("groupvit-s")
    tcfg = dataclasses.replace(cfg.text, layers=1, trim_multiple=trim_multiple)
    enc = groupvit.model.TextEncoder(tcfg)
    flat = texts.reshape(-1, texts.shape[-1])
    plan = enc.plan(flat).to("meta")
    enc = enc.to("meta")
    with FlopCounterMode(display=False) as fc:
        enc(flat.to("meta"), plan)
    return fc.get_total_flops()


@pytest.mark.parametrize("mix", ["demo", "gcc-like"])
def test_text_flops_drop_4x_on_realistic_lengths(mix):
    b = 256  # the recipe's per-GPU batch: 256 captions + 768 prompts
    if mix == "demo":
        texts = _demo_texts(b)
    else:
        rng = random.Random(0)
        texts = _texts([rng.choice(GCC_LIKE) for _ in range(b)], 3, 77, seed=2)
    full, trimmed = _text_flops(texts, 0), _text_flops(texts, 16)
    assert full / trimmed >= 4.0, (mix, full / trimmed)


# ---- host syncs -----------------------------------------------------------------------------------------------------

_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
# Host-side code that reads CPU tensors only, never device memory: the text plan of the loader's CPU batch (checked
# below to receive exactly that tensor), the Philox seed of the CPU generator, and the Triton interpreter itself
# (the CPU stand-in for a GPU launch).
_HOST_SIDE = ("plan", "draw_seed", "_host_seed")


def _count_reads(monkeypatch, opt: torch.optim.Optimizer) -> list[str]:
    """Patch every tensor -> Python read; each call outside the host-side functions above and not on the step
    counters of ``opt`` (CPU tensors on a GPU machine too, unless fused/capturable: torch keeps them on the host on
    purpose) is recorded: on a GPU each would be a device sync."""
    import sys

    calls: list[str] = []
    for name in _READS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            if any(self is st.get("step") for st in opt.state.values()):
                return _orig(self, *a, **k)
            f = sys._getframe(1)
            while f is not None:
                if f.f_code.co_name in _HOST_SIDE or "/triton/" in f.f_code.co_filename:
                    break
                f = f.f_back
            else:
                where = sys._getframe(1)
                calls.append(f"{_name} at {where.f_code.co_filename}:{where.f_lineno}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    make = torch.tensor

    def tensor(*a, **k):  # Python data -> a device tensor: a blocking copy (stream sync) on CUDA
        where = sys._getframe(1)  # not counted: an explicit "cpu" (a host tensor), AdamW's state (made once)
        if k.get("device") not in (None, "cpu") and where.f_code.co_name != "_init_group":
            calls.append(f"torch.tensor(device=...) at {where.f_code.co_filename}:{where.f_lineno}")
        return make(*a, **k)

    monkeypatch.setattr(torch, "tensor", tensor)
    return calls


def _tiny(seed: int = 0) -> groupvit.GroupViT:
    torch.manual_seed(seed)
    return groupvit.create_model("groupvit-tiny", **{"text.context_length": 77}).train()


def _batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(b, 3, 32, 32, generator=g), "texts": _texts(GCC_LIKE[seed : seed + b], 3, 77, seed)}


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_train_step_reads_the_host_once(backend, monkeypatch):
    model = _tiny()
    opt = build_optimizer(model, lr=1e-3)
    loss_fn = groupvit.GroupViTLoss()
    batch = _batch()
    planned = []
    plan = groupvit.model.TextEncoder.plan
    monkeypatch.setattr(
        groupvit.model.TextEncoder, "plan", lambda self, tokens: planned.append(tokens.data_ptr()) or plan(self, tokens)
    )
    calls = _count_reads(monkeypatch, opt)
    with ops.use_backend(backend):
        r = train_step(model, loss_fn, opt, batch, step=1)
    assert r["finite"] and len(calls) == 1 and "tolist" in calls[0], calls  # the step's one read of its results
    assert planned == [batch["texts"].data_ptr()]  # the plan read the loader's CPU tensor, before the transfer
    # the counter is not blind: the fused loss's input check (check_finite) reads the device once per loss call
    if backend == "triton":
        calls.clear()
        with ops.use_backend(backend):
            train_step(model, loss_fn, opt, batch, check_finite=True)
        assert len(calls) == 3, calls


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_train_step_syncs_once_on_gpu(backend):
    """On CUDA, torch's own sync detector sees exactly one synchronising call in a step (fused AdamW; the batch on
    the CPU as the loader gives it)."""
    import warnings

    model = _tiny().cuda()
    opt = build_optimizer(model, lr=1e-3)
    loss_fn = groupvit.GroupViTLoss()
    batch = _batch()
    with ops.use_backend(backend):
        train_step(model, loss_fn, opt, batch)  # lazy initialisation, autotuning
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(model, loss_fn, opt, batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


# ---- non-finite steps ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_nonfinite_step_skipped_alike_on_both_backends(backend):
    """A NaN temperature poisons the loss: skipped (nothing moves, BatchNorm statistics restored) with
    skip_nonfinite, NonFiniteLossError naming the step without, on the triton backend exactly as on eager."""
    model = _tiny()
    opt = build_optimizer(model, lr=1e-3)
    loss_fn = groupvit.GroupViTLoss()
    batch = _batch()
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    with ops.use_backend(backend):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
        with pytest.raises(NonFiniteLossError, match="step 7"):
            train_step(model, loss_fn, opt, batch, step=7)
        r = train_step(model, loss_fn, opt, batch, step=8, skip_nonfinite=True)
    assert r["skipped"] and not r["finite"] and math.isnan(r["loss"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], equal_nan=True, rtol=0, atol=0, msg=n)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, bufs[n], rtol=0, atol=0, msg=n)


# ---- compile=true ----------------------------------------------------------------------------------------------------

_INDUCTOR = os.environ.get("GROUPVIT_TEST_INDUCTOR") == "1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "compiler",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not _INDUCTOR,
                reason="inductor's C++ build of the tiny model's step takes minutes on a 2-core CPU; "
                "set GROUPVIT_TEST_INDUCTOR=1 to run it (the GPU benchmark compiles it too)",
            ),
        ),
    ],
)
def test_compiled_step_equals_eager(compiler):
    """compile=true: forward + both losses in one graph (fullgraph: no graph break), the same loss, gradients and
    updated weights as eager, on a batch whose texts run in two trimmed lengths. (One compile: ~30 s here.)"""
    import torch._inductor.config as inductor_config

    runs = []
    for forward in (None, compile_forward_loss(backend=compiler, fullgraph=True)):
        model = _tiny()
        opt = build_optimizer(model, lr=1e-3)
        losses = []
        torch.manual_seed(1)  # the Gumbel noise: inductor draws it with torch's generator (fallback_random)
        batch = _batch(seed=5)
        assert len(model.plan_text(batch["texts"]).groups) == 2
        with inductor_config.patch(fallback_random=True):
            losses.append(train_step(model, groupvit.GroupViTLoss(), opt, batch, forward=forward)["loss"])
        runs.append((losses, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_parameters())))
    (la, ga, pa), (lb, gb, pb) = runs
    assert la == pytest.approx(lb, rel=1e-5, abs=0)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(pb[n], pa[n], rtol=1e-5, atol=1e-7, msg=n)


# ---- FLOP/byte budget, threads ---------------------------------------------------------------------------------------


def test_step_budget_counts_every_part():
    from bench.bench_model import BUDGET_PARTS, step_budget

    cfg = get_config("groupvit-tiny")
    texts = _texts(GCC_LIKE[:8], 3, cfg.text.context_length)
    b8, b4 = step_budget("groupvit-tiny", 8, texts), step_budget("groupvit-tiny", 4, texts[:4])
    assert b8["step"]["flop"] == sum(b8[p]["flop"] for p in BUDGET_PARTS) > 0
    assert b8["image tower"]["flop"] == 2 * b4["image tower"]["flop"] > 0  # per-sample work
    assert b8["text tower"]["flop"] > 0 and b8["losses"]["flop"] > 0 and b8["optimizer"]["flop"] == 0  # elementwise
    n = sum(p.numel() for p in groupvit.create_model("groupvit-tiny").parameters())
    assert b8["optimizer"]["bytes"] >= 7 * 4 * n  # AdamW reads params, grads, two moments and writes three, fp32


def test_torch_threads_default_is_cores_minus_workers(monkeypatch):
    from train.config import load_config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cfg = load_config(preset="demo", overrides=["data.num_workers=3"])
    assert cfg.torch_threads() == 5 and cfg.torch_threads(local_ranks=2) == 1  # 8 // 2 - 3
    assert load_config(preset="demo", overrides=["threads=3"]).torch_threads(local_ranks=4) == 3
    with pytest.raises(ValueError, match="threads must be >= 1"):
        load_config(preset="demo", overrides=["threads=0"])
