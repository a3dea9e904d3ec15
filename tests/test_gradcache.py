"""Micro-batched contrastive steps (train/gradcache.py): one step with the towers in micro-batches of m equals the
step with the whole batch in memory -- loss, every gradient, BatchNorm running statistics, optimizer state -- for m
dividing B and not, eager and triton, 1 and 2 processes; the replay draws the cache pass's Gumbel noise and
drop-path; activation memory follows the micro-batch; the driver resumes exactly with micro-batches."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import groupvit
from groupvit import ops
from tests.dist_gradcache_worker import ddp_step_case
from tests.dist_utils import run_distributed
from tests.helpers import deterministic_towers, make_batch
from train.gradcache import micro_slices
from train.loop import NonFiniteLossError, train_step
from train.optim import build_optimizer

TINY = "groupvit-tiny"  # img 32, K = 3 prompts, context 16, BatchNorm in both projectors


def assert_tensors_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    """Per tensor ``|a - b| <= rtol * (|b| + |g|)`` in the 2-norm, ``|g|`` the global norm of ``b``: the floor
    measures the gradients that are zero in exact arithmetic (biases before a LayerNorm, a BatchNorm or a softmax
    over groups: rounding noise of up to ~1e-8 in fp64 here, against a global norm of ~65) on the global scale."""
    assert a.keys() == b.keys()
    gnorm = torch.sqrt(sum((v.double() ** 2).sum() for v in b.values()))
    for n in b:
        err = (a[n].double() - b[n].double()).norm()
        assert err <= rtol * (b[n].double().norm() + gnorm), (n, err.item(), b[n].norm().item())


def _step_state(model: groupvit.GroupViT, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    st = {
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }
    st["opt"] = {f"{n}.{k}": v.clone() for n, p in model.named_parameters() for k, v in opt.state[p].items()}
    return st


def test_micro_slices():
    assert [(s.start, s.stop) for s in micro_slices(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert [(s.start, s.stop) for s in micro_slices(4, 4)] == [(0, 4)]
    with pytest.raises(ValueError, match="micro_batch"):
        list(micro_slices(4, 0))


@pytest.mark.parametrize("backend,micro", [("eager", 2), ("eager", 4), ("triton", 4)])
def test_step_equals_full_batch_step(backend, micro, device):
    """One step, B = 6, m = 2 (divides) or 4 (does not), on the kernel device: fp64 agreement to 1e-9 with the
    plain step."""
    torch.manual_seed(0)
    base = groupvit.create_model(TINY).double().to(device)
    batch = make_batch(6, seed=1)
    states, losses = [], []
    for mb in (None, micro):
        model = deterministic_towers(copy.deepcopy(base))
        opt = build_optimizer(model, lr=1e-3)
        with ops.use_backend(backend):
            r = train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=mb)
        losses.append((r["loss"], r["loss_itc"], r["loss_ml"], r["grad_norm"]))
        states.append(_step_state(model, opt))
    plain, micro_st = states
    assert losses[1] == pytest.approx(losses[0], rel=1e-12, abs=0)
    for key in ("grads", "params", "buffers", "opt"):
        assert_tensors_close(micro_st[key], plain[key], rtol=1e-9)
    assert micro_st["buffers"]["img_projector.linear_hidden.1.num_batches_tracked"] == 1  # running stats: once


def test_step_equals_full_batch_step_fp32():
    """fp32, m = 3 of B = 7: the micro-batch gradient is as close to the fp64 gradient as the plain fp32 step's
    (both differ from it by float rounding only; at this random init the plain fp32 gradient is ~1.5e-5 away from
    fp64 in the global relative 2-norm, so fp32 agreement cannot be asked much tighter than that)."""
    torch.manual_seed(0)
    base = groupvit.create_model(TINY)
    batch = make_batch(7, seed=2)
    grads = {}
    for dtype, mb in ((torch.float64, None), (torch.float32, None), (torch.float32, 3)):
        model = deterministic_towers(copy.deepcopy(base).to(dtype))
        opt = build_optimizer(model, lr=1e-3)
        b = {"images": batch["images"].to(dtype), "texts": batch["texts"]}
        train_step(model, groupvit.GroupViTLoss(), opt, b, micro_batch=mb, clip_grad=0)
        grads[dtype, mb] = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
    ref = grads[torch.float64, None]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    floor = rel(grads[torch.float32, None], ref)
    assert floor < 1e-4
    assert rel(grads[torch.float32, 3], ref) <= 1.5 * floor
    assert rel(grads[torch.float32, 3], grads[torch.float32, None]) <= 2 * floor


def _reference_step(model: groupvit.GroupViT, batch: dict[str, torch.Tensor], micro: int) -> dict[str, torch.Tensor]:
    """The whole batch in one graph, towers run micro-batch by micro-batch (so the random draws come in the same
    order as in the cache pass), projectors and losses over all rows, one backward."""
    images, texts = batch["images"], batch["texts"]
    feats = [model.forward_towers(images[s], texts[s]) for s in micro_slices(images.shape[0], micro)]
    out = model.project(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), num_texts=texts.shape[1])
    loss = groupvit.GroupViTLoss()(out)["loss"]
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("backend,micro", [("eager", 2), ("triton", 4)])
def test_replay_draws_the_cache_pass_noise(backend, micro, device, monkeypatch):
    """Training mode (Gumbel noise on the hard assignment, drop-path 0.3), on the kernel device (CPU interpreter, or
    CUDA: then eager draws from the CUDA generator): the step's gradient equals that of the one-graph reference
    drawing the same noise, the RNGs end where the reference leaves them, and replaying without restoring the RNG
    gives a different gradient (the test sees the noise)."""
    import train.gradcache as gc
    from train.gradcache import gradcache_backward

    torch.manual_seed(0)
    base = groupvit.create_model(TINY, **{"vision.drop_path_rate": 0.3}).double().train().to(device)
    batch = {k: v.to(device) for k, v in make_batch(6, seed=3).items()}

    def run(fn):
        model = copy.deepcopy(base)
        torch.manual_seed(123)
        with ops.use_backend(backend):
            out = fn(model)
        rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}, rng

    (ref, _, ref_rng) = run(lambda m: _reference_step(m, batch, micro))
    ref_grads = {k: v for k, v in ref.items() if k != "loss"}
    loss_fn = groupvit.GroupViTLoss()
    gc_fn = lambda m: gradcache_backward(m, loss_fn, batch["images"], batch["texts"], micro)  # noqa: E731
    losses, grads, rng = run(gc_fn)
    assert losses["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-12)
    assert_tensors_close(grads, ref_grads, rtol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(rng, ref_rng))
    monkeypatch.setattr(gc, "_rng_set", lambda state, device: None)  # replay on from the cache pass's end state
    _, wrong, _ = run(gc_fn)
    with pytest.raises(AssertionError):
        assert_tensors_close(wrong, ref_grads, rtol=1e-6)


def test_two_process_step_equals_ddp_step():
    """2 gloo processes, 4 rows each (global contrastive batch 8, CPU SyncBatchNorm), two steps: micro-batches of 2
    or 3 reproduce the DDP step on each rank (the second step's gradients are compared with the same floor), and the
    replicas stay identical."""
    ranks = run_distributed(ddp_step_case, 2, 4, [0, 2, 3], timeout=180)
    for plain, *micro in ranks:
        for m in micro:
            assert m["loss"] == pytest.approx(plain["loss"], rel=1e-12)
            for key in ("grads", "params", "buffers"):
                assert_tensors_close(m[key], plain[key], rtol=1e-8)
            for sm, sp in zip(m["opt"], plain["opt"]):
                assert_tensors_close(sm, sp, rtol=1e-8)
    assert ranks[0][0]["loss"] != ranks[1][0]["loss"]  # different local rows
    for n, v in ranks[0][2]["params"].items():
        assert torch.equal(v, ranks[1][2]["params"][n]), n


class SavedActivations:
    """Peak bytes of the distinct tensor storages autograd holds for backward (``saved_tensors_hooks``), leaving out
    the storages given (parameters, inputs)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.live, self.current, self.peak = exclude, {}, 0, 0

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude:
            return t
        entry = self.live.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Held(self, key, t)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]


class _Held:
    def __init__(self, meter: SavedActivations, key: int, t: torch.Tensor) -> None:
        self.meter, self.key, self.t = meter, key, t

    def __del__(self) -> None:
        self.meter.release(self.key)


def _peak_saved(model: groupvit.GroupViT, batch: dict[str, torch.Tensor], micro: int | None) -> int:
    opt = build_optimizer(model, lr=1e-3)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in batch.values()}
    meter = SavedActivations(exclude)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda h: h.t if isinstance(h, _Held) else h):
        train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=micro)
    assert meter.current == 0  # every saved activation was released
    return meter.peak


def test_activation_memory_follows_the_micro_batch():
    """Contrastive batch 8 in micro-batches of 2: at most 1.3x the saved activations of a plain step of 2 (a
    plain step of 8 holds about 4x)."""
    torch.manual_seed(0)
    model = groupvit.create_model(TINY).train()
    big = {k: v.float() if v.is_floating_point() else v for k, v in make_batch(8, seed=4).items()}
    small = {k: v[:2].clone() for k, v in big.items()}
    plain_small = _peak_saved(model, small, None)
    plain_big = _peak_saved(model, big, None)
    micro_big = _peak_saved(model, big, 2)
    assert plain_big >= 3.5 * plain_small, (plain_big, plain_small)  # the meter sees activations grow
    assert micro_big <= 1.3 * plain_small, (micro_big, plain_small)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_cuda_peak_memory_follows_the_micro_batch(backend):
    """On a GPU (``max_memory_allocated`` above the weights, gradients and optimizer state of a warmed-up step):
    contrastive batch 256 in micro-batches of 64 stays within 1.3x a plain step of 64."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = groupvit.create_model(TINY).to(dev).train()
    opt = build_optimizer(model, lr=1e-4)
    big = {k: v.float() if v.is_floating_point() else v for k, v in make_batch(256, seed=7).items()}
    small = {k: v[:64].clone() for k, v in big.items()}

    def peak(batch, micro):
        with ops.use_backend(backend):
            train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=micro)  # warm-up: state, kernels
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=micro)
            torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base

    plain_small, plain_big, micro_big = peak(small, None), peak(big, None), peak(big, 64)
    assert plain_big >= 2.5 * plain_small, (plain_big, plain_small)
    assert micro_big <= 1.3 * plain_small, (micro_big, plain_small)


def test_nonfinite_micro_batch_step_is_not_applied():
    torch.manual_seed(0)
    model = groupvit.create_model(TINY).train()
    opt = build_optimizer(model, lr=1e-3)
    batch = {k: v.float() if v.is_floating_point() else v for k, v in make_batch(4, seed=6).items()}
    train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=3)
    with torch.no_grad():
        model.img_encoder.layers[0].group_token[0, 0, 0] = float("inf")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=3, step=3)
    r = train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=3, skip_nonfinite=True)
    assert r["skipped"] and not math.isfinite(r["loss"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], equal_nan=True, rtol=0, atol=0, msg=n)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, bufs[n], rtol=0, atol=0, msg=n)
    assert all(p.grad is None for p in model.parameters())


def test_driver_with_micro_batches_resumes_exactly(tmp_path):
    """train(micro_batch=3, batch 4): 2 steps straight equal 1 step, a stop and a resume."""
    from train.checkpoint import LATEST, load_training_checkpoint
    from train.config import load_config
    from train.loop import train
    from train.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "data", n_train=8, n_val=0, seed=0, size=32, shard_size=4)

    def cfg(out: Path, **kw):
        ov = {
            "data.train_shards": [shards.train_pattern],
            "data.batch_size": 4,
            "data.num_workers": 0,
            "data.img_size": 32,
            "data.shuffle_buffer": 4,
            "data.augment": False,
            "data.multi_label": 0,
            "model.preset": TINY,
            "optim.steps_per_epoch": 2,
            "optim.epochs": 1,
            "optim.warmup_epochs": 0,
            "optim.lr_ref_batch": 4,
            "output_dir": str(out),
            "log_interval": 1,
            "progress": False,
            "seed": 2,
            "micro_batch": 3,
            **kw,
        }
        return load_config(overrides=ov)

    with pytest.raises(ValueError, match="micro_batch must be >= 0"):
        cfg(tmp_path / "x", micro_batch=-1)
    with pytest.raises(ValueError, match="compile=true does not apply to micro-batched steps"):
        cfg(tmp_path / "x", compile=True)
    full = [h["loss"] for h in train(cfg(tmp_path / "full"))["history"]]
    part = [h["loss"] for h in train(cfg(tmp_path / "cut", max_steps=1))["history"]]
    rest = [h["loss"] for h in train(cfg(tmp_path / "cut", resume="auto"))["history"]]
    assert len(full) == 2 and all(math.isfinite(v) for v in full)
    assert part + rest == pytest.approx(full, abs=1e-6, rel=0)
    a, b = (load_training_checkpoint(tmp_path / d / LATEST) for d in ("full", "cut"))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)
    assert a["train_config"]["micro_batch"] == 3
    with pytest.warns(UserWarning, match="different micro_batch"):  # finished run: resumes, warns, trains nothing
        train(cfg(tmp_path / "cut", resume="auto", micro_batch=None))
