"""Training program: config parsing, AdamW split, lr schedule, train_step (loss decrease, non-finite handling),
atomic checkpoints, and end-to-end runs on synthetic shards including kill-and-resume equality."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import groupvit
from train.checkpoint import (LATEST, load_training_checkpoint, resolve_resume, rng_state, save_training_checkpoint,
                              set_rng_state)
from train.config import TrainConfig, load_config
from train.loop import NonFiniteLossError, train_step
from train.optim import CosineSchedule, LRStepper, build_optimizer, param_groups

TINY = "groupvit-tiny"


def _tiny_model(seed: int = 0) -> groupvit.GroupViT:
    torch.manual_seed(seed)
    return groupvit.create_model(TINY)  # img 32, K = 3, context 16


def _batch(b: int = 6, seed: int = 0, ctx: int = 16) -> dict[str, torch.Tensor]:
    """Random images with a caption + 3 prompts per image built from a small colour/shape vocabulary."""
    from train.tokenizer import tokenize

    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    texts = []
    for _ in range(b):
        c, s = rng.choice(colours), rng.choice(shapes)
        texts += [f"a {c} {s}.", f"a photo of a {c}.", f"a photo of a {s}.", f"a {c} {s}."]
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(b, 3, 32, 32, generator=g), "texts": tokenize(texts, ctx).reshape(b, 4, ctx)}


# ---- config -------------------------------------------------------------------------------------------------------


def test_config_overrides_file_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 12\n  train_shards: ['a-{0..1}.tar', b.tar]\noptim:\n  epochs: 3\nseed: 5\n")
    cfg = load_config(f, preset="demo", overrides=["optim.base_lr=1e-3", "optim.betas=[0.8, 0.9]",
                                                   "model.vision.depths=[1,1,1]", "resume=auto", "max_steps=null"])
    assert cfg.data.batch_size == 12 and cfg.data.train_shards == ["a-{0..1}.tar", "b.tar"]
    assert cfg.optim.epochs == 3 and cfg.seed == 5 and cfg.resume == "auto" and cfg.max_steps is None
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.overrides["vision.depths"] == [1, 1, 1] and cfg.model.preset == "groupvit-tiny"
    # JSON round trip through to_dict
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert load_config(j) == cfg
    for bad, what in [("optim.lr=1", "optim.lr"), ("data.batch_size=abc", "data.batch_size"),
                      ("nosuch.key=1", "nosuch"), ("model.vision.nope=3", "nope"), ("precision=fp8", "fp8"),
                      ("data.batch_size=0", "batch_size"), ("novalue", "key=value")]:
        with pytest.raises(ValueError, match=what):
            load_config(preset="demo", overrides=[bad])
    with pytest.raises(ValueError, match="unknown training preset"):
        load_config(preset="nope")


def test_recipe_preset_matches_spec():
    cfg = load_config(preset="gcc-yfcc")
    assert cfg.steps_per_epoch(world_size=16) == 6997  # 28,663,147 // 4096
    assert cfg.steps_per_epoch(16) * cfg.optim.epochs == 209_910
    base, warm, lo = cfg.scaled_lrs(world_size=16)  # global batch 4096: the unscaled recipe
    assert (base, warm, lo) == pytest.approx((1.6e-3, 4e-6, 4e-5), rel=1e-12)
    base8, _, _ = cfg.scaled_lrs(world_size=8)  # global 2048 halves every lr
    assert base8 == pytest.approx(0.8e-3, rel=1e-12)
    o = cfg.optim
    assert (o.weight_decay, o.betas, o.eps, o.clip_grad, o.warmup_epochs) == (0.05, (0.9, 0.999), 1e-8, 5.0, 2)


# ---- optimizer and schedule -----------------------------------------------------------------------------------------


def test_weight_decay_split_and_effect():
    model = _tiny_model()
    groups = {g["group"]: set(g["names"]) for g in param_groups(model, 0.05)}
    decay, no_decay = groups["decay"], groups["no_decay"]
    names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == names and not decay & no_decay
    for n in ["logit_scale", "multi_label_logit_scale", "img_encoder.pos_embed", "img_encoder.layers.0.group_token",
              "img_encoder.layers.1.group_token", "img_encoder.patch_embed.proj.weight",
              "text_encoder.positional_embedding", "text_encoder.token_embedding.weight",
              "img_projector.linear_out.weight", "img_encoder.layers.0.blocks.0.attn.qkv.weight"]:
        assert n in decay, n
    for n in ["img_encoder.norm.weight", "img_encoder.norm.bias", "img_projector.linear_hidden.1.weight",
              "img_projector.linear_hidden.1.bias", "text_encoder.transformer.resblocks.0.attn.in_proj_bias",
              "img_encoder.layers.0.blocks.0.attn.qkv.bias", "img_projector.linear_out.bias"]:
        assert n in no_decay, n
    # behaviour: one AdamW step with all-zero gradients only applies the decoupled decay p <- p (1 - lr wd)
    lr, wd = 0.1, 0.05
    opt = build_optimizer(model, lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        want = before[n] * (1 - lr * wd) if n in decay else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=n)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07) * (1 - lr * wd), rel=1e-6)


def test_lr_schedule_values():
    base, warm, lo, w, t = 2e-3, 1e-5, 5e-5, 10, 50
    s = CosineSchedule(base, warm, lo, w, t)
    assert s.lr_at(0) == warm  # warm-up start
    assert s.lr_at(5) == pytest.approx(warm + 5 * (base - warm) / w, rel=1e-12)
    assert s.lr_at(w - 1) == pytest.approx(base - (base - warm) / w, rel=1e-12)  # warm-up end
    # warm-up is not a prefix: the cosine at step w uses the absolute step w / t
    assert s.lr_at(w) == pytest.approx(lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * 10 / 50)), rel=1e-12)
    assert s.lr_at(w) < base
    assert s.lr_at(t - 1) == pytest.approx(lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * 49 / 50)), rel=1e-12)
    assert s.lr_at(t) == lo and s.lr_at(10 * t) == lo
    assert CosineSchedule(base, warm, lo, 0, t).lr_at(0) == base
    with pytest.raises(ValueError):
        CosineSchedule(base, warm, lo, 60, 50)
    # the stepper applies lr_at(step) to every group and checkpoints the step
    model = _tiny_model()
    opt = build_optimizer(model, lr=1.0)
    st = LRStepper(opt, s)
    assert all(g["lr"] == warm for g in opt.param_groups)
    for _ in range(12):
        st.step()
    assert all(g["lr"] == s.lr_at(12) for g in opt.param_groups)
    st2 = LRStepper(build_optimizer(model, lr=1.0), s)
    st2.load_state_dict(st.state_dict())
    assert st2.last_step == 12 and all(g["lr"] == s.lr_at(12) for g in st2.optimizer.param_groups)


# ---- train_step ---------------------------------------------------------------------------------------------------


def test_train_step_decreases_loss_on_fixed_batch():
    model = _tiny_model()
    opt = build_optimizer(model, lr=2e-3)
    loss_fn = groupvit.GroupViTLoss()
    batch = _batch(6, seed=1)
    losses = [train_step(model, loss_fn, opt, batch)["loss"] for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_nonfinite_loss_reported_and_skipped():
    model = _tiny_model()
    model.train()
    opt = build_optimizer(model, lr=1e-3)
    loss_fn = groupvit.GroupViTLoss()
    batch = _batch(4, seed=2)
    r = train_step(model, loss_fn, opt, batch, skip_nonfinite=False)  # one good step builds optimizer state
    assert r["finite"] and not r["skipped"]
    with torch.no_grad():
        model.img_encoder.layers[0].group_token[0, 0, 0] = float("inf")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(NonFiniteLossError, match="step 17"):
        train_step(model, loss_fn, opt, batch, step=17)
    r = train_step(model, loss_fn, opt, batch, skip_nonfinite=True, step=18)
    assert r["skipped"] and not r["finite"] and not math.isfinite(r["loss"])
    for n, p in model.named_parameters():  # nothing moved (the injected inf included)
        torch.testing.assert_close(p.detach(), params[n], equal_nan=True, rtol=0, atol=0, msg=n)
    for n, b in model.named_buffers():  # BatchNorm running stats restored after the poisoned forward
        torch.testing.assert_close(b, bufs[n], rtol=0, atol=0, msg=n)
    for p, s in opt.state.items():
        for k, v in s.items():
            torch.testing.assert_close(v, opt_state[id(p)][k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


# ---- checkpoints --------------------------------------------------------------------------------------------------


def _save(path: Path, model, opt, step: int) -> None:
    st = LRStepper(opt, CosineSchedule(1e-3, 1e-5, 1e-5, 2, 10), step)
    save_training_checkpoint(path, model=model, optimizer=opt, scheduler=st, scaler=None,
                             train_config=TrainConfig().to_dict(), step=step, epoch=0, batch=step, rng=[rng_state()])


def test_atomic_checkpoint_survives_crash_mid_save(tmp_path, monkeypatch):
    model = _tiny_model()
    opt = build_optimizer(model, lr=1e-3)
    train_step(model, groupvit.GroupViTLoss(), opt, _batch(4))
    path = tmp_path / LATEST
    _save(path, model, opt, step=3)
    good = path.read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(1000)  # a partial file on disk, then the "crash"
        raise OSError("simulated crash mid-save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        _save(path, model, opt, step=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]  # no temp file left behind
    ck = load_training_checkpoint(path)
    assert ck["step"] == 3
    # the checkpoint is also a model file for groupvit.load_checkpoint
    m2 = groupvit.load_checkpoint(path)
    assert not torch.equal(m2.logit_scale, model.logit_scale)
    # truncated file -> clear error
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good[:500])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_training_checkpoint(bad)


def test_rng_state_round_trip_and_resume_resolution(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    s = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    set_rng_state(s)
    b = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]
    assert resolve_resume(None, tmp_path) is None and resolve_resume("auto", tmp_path) is None
    (tmp_path / LATEST).write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == tmp_path / LATEST
    assert resolve_resume(str(tmp_path), "elsewhere") == tmp_path / LATEST
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
