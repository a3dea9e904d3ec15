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
from train.checkpoint import (
    LATEST,
    load_training_checkpoint,
    resolve_resume,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from train.config import TrainConfig, load_config
from train.loop import NonFiniteLossError, train_step
from train.optim import CosineSchedule, LRStepper, build_optimizer, param_groups

TINY = "groupvit-tiny"


def _tiny_model(seed: int = 0) -> groupvit.GroupViT:
    torch.manual_seed(seed)
    return groupvit.create_model(TINY)  # img 32, K = 3, context 16


def _batch(b: int = 6, seed: int = 0, ctx: int = 16) -> dict[str, torch.Tensor]:
    """Random images with a caption + 3 prompts per image built from a small colour/shape vocabulary."""
    from groupvit.tokenizer import tokenize

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
    cfg = load_config(
        f,
        preset="demo",
        overrides=[
            "optim.base_lr=1e-3",
            "optim.betas=[0.8, 0.9]",
            "model.vision.depths=[1,0]",
            "resume=auto",
            "max_steps=null",
        ],
    )
    assert cfg.data.batch_size == 12 and cfg.data.train_shards == ["a-{0..1}.tar", "b.tar"]
    assert cfg.optim.epochs == 3 and cfg.seed == 5 and cfg.resume == "auto" and cfg.max_steps is None
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.overrides["vision.depths"] == [1, 0] and cfg.model.preset == "groupvit-tiny"
    # JSON round trip through to_dict
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert load_config(j) == cfg
    for bad, what in [
        ("optim.lr=1", "optim.lr"),
        ("data.batch_size=abc", "data.batch_size"),
        ("nosuch.key=1", "nosuch"),
        ("model.vision.nope=3", "nope"),
        ("precision=fp8", "fp8"),
        ("data.batch_size=0", "batch_size"),
        ("novalue", "key=value"),
    ]:
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
    for n in [
        "logit_scale",
        "multi_label_logit_scale",
        "img_encoder.pos_embed",
        "img_encoder.layers.0.group_token",
        "img_encoder.layers.1.group_token",
        "img_encoder.patch_embed.proj.weight",
        "text_encoder.positional_embedding",
        "text_encoder.token_embedding.weight",
        "img_projector.linear_out.weight",
        "img_encoder.layers.0.blocks.0.attn.qkv.weight",
    ]:
        assert n in decay, n
    for n in [
        "img_encoder.norm.weight",
        "img_encoder.norm.bias",
        "img_projector.linear_hidden.1.weight",
        "img_projector.linear_hidden.1.bias",
        "text_encoder.transformer.resblocks.0.attn.in_proj_bias",
        "img_encoder.layers.0.blocks.0.attn.qkv.bias",
        "img_projector.linear_out.bias",
    ]:
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


def test_train_step_leaves_frozen_parameters_untouched():
    """``frozen`` (``optim.freeze_grouping_steps``): those parameters keep their values bit for bit (no AdamW step, no
    weight decay, no optimizer state), the others move; the clip norm is over the unfrozen gradients only."""
    model = _tiny_model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    loss_fn = groupvit.GroupViTLoss()
    batch = _batch(4, seed=3)
    frozen = model.grouping_parameters()
    ids = {id(p) for p in frozen}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _tiny_model()
    ref_opt = build_optimizer(ref, lr=1e-3, weight_decay=0.05)
    torch.manual_seed(7)  # the same Gumbel noise in both steps
    r_ref = train_step(ref, loss_fn, ref_opt, batch, clip_grad=0.0)  # the same step without freezing
    full_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    torch.manual_seed(7)
    r = train_step(model, loss_fn, opt, batch, clip_grad=0.0, frozen=frozen)
    for n, p in model.named_parameters():
        if id(p) in ids:
            assert torch.equal(p.detach(), before[n]), n
            assert p not in opt.state or not opt.state[p], n
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p.detach(), before[n]), n
    unfrozen = [g for n, g in full_grads.items() if id(dict(model.named_parameters())[n]) not in ids]
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unfrozen])).item()
    assert math.isclose(r["grad_norm"], want, rel_tol=1e-4) and r["grad_norm"] < r_ref["grad_norm"]
    assert math.isclose(r["loss"], r_ref["loss"], rel_tol=1e-6)


# ---- checkpoints --------------------------------------------------------------------------------------------------


def _save(path: Path, model, opt, step: int) -> None:
    st = LRStepper(opt, CosineSchedule(1e-3, 1e-5, 1e-5, 2, 10), step)
    save_training_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scheduler=st,
        scaler=None,
        train_config=TrainConfig().to_dict(),
        step=step,
        epoch=0,
        batch=step,
        rng=[rng_state()],
    )


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


# ---- the driver on synthetic shards -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from train.synthetic import write_synthetic_shards

    out = write_synthetic_shards(tmp_path_factory.mktemp("shapes"), n_train=96, n_val=0, seed=0, size=32, shard_size=16)
    return out.train_pattern


def _run_cfg(shards: str, out: Path, **kw) -> TrainConfig:
    ov = {
        "data.train_shards": [shards],
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.img_size": 32,
        "data.shuffle_buffer": 32,
        "data.augment": True,
        "data.multi_label": 0,
        "model.preset": TINY,
        "optim.steps_per_epoch": 4,
        "optim.epochs": 2,
        "optim.warmup_epochs": 0.5,
        "optim.lr_ref_batch": 8,
        "output_dir": str(out),
        "log_interval": 1,
        "ckpt_interval": 100,
        "progress": False,
        "seed": 3,
    }
    ov.update(kw)
    return load_config(overrides=ov)


def test_kill_and_resume_gives_identical_losses(shards, tmp_path):
    from train.loop import train

    full = train(_run_cfg(shards, tmp_path / "full"))
    losses = [h["loss"] for h in full["history"]]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    # "killed" after 3 steps (mid-epoch 0), then resumed from latest.pt: crosses the epoch boundary afterwards
    part = train(_run_cfg(shards, tmp_path / "cut", max_steps=3))
    assert [h["step"] for h in part["history"]] == [0, 1, 2] and load_training_checkpoint(tmp_path / "cut" / LATEST)[
        "batch"
    ] == 3
    rest = train(_run_cfg(shards, tmp_path / "cut", resume="auto"))
    assert [h["step"] for h in rest["history"]] == list(range(3, 8))
    resumed = [h["loss"] for h in part["history"] + rest["history"]]
    assert resumed == pytest.approx(losses, abs=1e-6, rel=0), (resumed, losses)
    # the final weights agree as well, and the resumed run's JSONL continues the step sequence
    a = load_training_checkpoint(tmp_path / "full" / LATEST)
    b = load_training_checkpoint(tmp_path / "cut" / LATEST)
    assert a["step"] == b["step"] == 8 and (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) == (2, 0)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # completed steps, as the progress bar counts


def test_driver_decreases_loss_and_logs(shards, tmp_path, shared_data):
    from train.data import build_loader
    from train.distributed import setup_distributed
    from train.loop import seed_everything, train

    cfg = _run_cfg(
        shards,
        tmp_path,
        **{
            "data.multi_label": 3,
            "optim.steps_per_epoch": 6,
            "optim.epochs": 2,
            "log_interval": 5,
            "ckpt_interval": 4,
            "data.augment": False,
        },
    )
    # held-out check batch: 16 samples of the same stream (eval mode: no Gumbel noise, BN running stats)
    ref = dataclasses_replace(cfg, data=dataclasses_replace(cfg.data, batch_size=16), seed=99)
    batch = next(build_loader(ref, setup_distributed("cpu"), steps_per_epoch=1, context_length=16).iter_epoch(0))
    seed_everything(cfg.seed)
    init = groupvit.create_model(TINY, **cfg.model_overrides())  # the trainer's initialisation (same seed)

    def eval_loss(m):
        m.eval()
        with torch.no_grad():
            return groupvit.GroupViTLoss()(m(batch["images"], batch["texts"]))["loss"].item()

    s = train(cfg)
    trained = groupvit.load_checkpoint(tmp_path / LATEST)
    before, after = eval_loss(init), eval_loss(trained)
    assert after < before - 0.3, (before, after)
    losses = [h["loss"] for h in s["history"]]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10, 12]
    for r in recs:
        assert {"loss", "loss_itc", "loss_ml", "lr", "logit_scale", "images_per_s", "data_wait", "data"} <= set(r)
        assert math.isfinite(r["loss_ml"]) and r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert r["loss"] == pytest.approx(r["loss_itc"] + r["loss_ml"], rel=1e-6)
    assert recs[0]["loss"] == pytest.approx(np.mean(losses[:5]), rel=1e-9)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stopped_by"] == "completed" and summary["data"]["skipped"] == 0
    ck = load_training_checkpoint(tmp_path / LATEST)
    assert ck["step"] == 12 and ck["train_config"]["data"]["multi_label"] == 3 and (ck["epoch"], ck["batch"]) == (2, 0)


def test_driver_skips_bad_data_and_nonfinite_steps(shards, tmp_path, monkeypatch):
    """A shard with a corrupt image and an empty caption is counted, and a poisoned step is skipped, not fatal."""

    from PIL import Image

    import train.loop as loop
    from train.data import write_shards

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30)]
    good = [
        (f"g{i}", Image.new("RGB", (32, 32), colours[i % 4]), f"a {['red', 'green', 'blue', 'yellow'][i % 4]} square")
        for i in range(24)
    ]
    paths = write_shards(
        [("k0", b"\xff\xd8 not a jpeg", "a red square"), ("k1", good[0][1], "  "), ("k2", good[0][1], None), *good],
        tmp_path / "bad",
        "bad",
        maxcount=27,
    )
    trunc = write_shards(good[:8], tmp_path / "bad", "cut", maxcount=8)[0]
    Path(trunc).write_bytes(Path(trunc).read_bytes()[:5000])  # a truncated shard
    cfg = _run_cfg(
        shards,
        tmp_path / "run",
        **{
            "data.train_shards": [paths[0], trunc],
            "optim.steps_per_epoch": 3,
            "optim.epochs": 1,
            "skip_nonfinite": True,
        },
    )
    real = loop.train_step
    calls = []

    def poisoned(model, *a, **k):  # step 2 (of 1, 2, 3) gets an inf parameter, restored afterwards
        calls.append(k["step"])
        if k["step"] != 2:
            return real(model, *a, **k)
        p = loop.unwrap(model).logit_scale
        keep = p.detach().clone()
        with torch.no_grad():
            p.fill_(float("nan"))
        try:
            return real(model, *a, **k)
        finally:
            with torch.no_grad():
                p.copy_(keep)

    monkeypatch.setattr(loop, "train_step", poisoned)
    s = loop.train(cfg)
    assert calls == [1, 2, 3] and [h["skipped"] for h in s["history"]] == [False, True, False]
    assert s["skipped_steps"] == 1 and s["steps"] == 3
    d = s["data"]  # every raw sample is read before the first batch (shuffle buffer): all kinds are counted
    assert d["empty_captions"] >= 1 and d["missing_captions"] >= 1 and d["shard_errors"] >= 1, d
    assert d["corrupt_images"] <= d["samples"] and d["batches"] == 3
    with pytest.raises(NonFiniteLossError, match="step 2"):
        loop.train(dataclasses_replace(cfg, skip_nonfinite=False, output_dir=str(tmp_path / "run2")))


def dataclasses_replace(cfg: TrainConfig, **kw) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_cli_print_config_and_errors(capsys):
    from train.__main__ import main

    assert main(["--preset", "demo", "--print-config", "optim.epochs=3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["epochs"] == 3 and cfg["data"]["img_size"] == 64
    with pytest.raises(SystemExit):
        main(["--preset", "demo", "optim.nope=1"])
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err


def test_cli_triton_on_cpu_names_the_config_key(capsys, monkeypatch):
    from train.__main__ import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--preset", "demo", "backend=triton", "device=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "set backend=eager" in err and "TRITON_INTERPRET=1" in err
    assert "set_backend" not in err


def test_driver_freezes_the_grouping_path_for_the_first_steps(shards, tmp_path):
    """``optim.freeze_grouping_steps=3`` in a real run: after 3 steps the grouping parameters are still those of
    the initialisation while everything else has moved; 2 steps later they have moved too."""
    from train.loop import seed_everything, train

    with pytest.raises(ValueError, match="freeze_grouping_steps"):
        load_config(preset="demo", overrides=["optim.freeze_grouping_steps=-1"])
    cfg = _run_cfg(shards, tmp_path / "a", **{"optim.freeze_grouping_steps": 3, "max_steps": 3})
    seed_everything(cfg.seed)
    init = groupvit.create_model(TINY, **cfg.model_overrides())
    train(cfg)
    frozen_ids = {id(p) for p in init.grouping_parameters()}
    init_sd = dict(init.named_parameters())
    names = [n for n, p in init_sd.items() if id(p) in frozen_ids]
    after3 = dict(groupvit.load_checkpoint(tmp_path / "a" / LATEST).named_parameters())
    assert all(torch.equal(after3[n], init_sd[n]) for n in names)
    assert not torch.equal(
        after3["img_encoder.layers.0.downsample.assign.v_proj.weight"],
        init_sd["img_encoder.layers.0.downsample.assign.v_proj.weight"],
    )
    cfg5 = _run_cfg(shards, tmp_path / "b", **{"optim.freeze_grouping_steps": 3, "max_steps": 5})
    train(cfg5)
    after5 = dict(groupvit.load_checkpoint(tmp_path / "b" / LATEST).named_parameters())
    assert not torch.equal(
        after5["img_encoder.layers.0.downsample.assign.q_proj.weight"],
        init_sd["img_encoder.layers.0.downsample.assign.q_proj.weight"],
    )
