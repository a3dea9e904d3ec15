"""Helper for tests/test_gradcache.py, run on gloo processes through ``tests.dist_utils.run_distributed``."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def ddp_step_case(rank: int, world: int, local_batch: int, micro_batches: list[int]) -> list[dict]:
    """Two optimizer steps of a DDP GroupViT (CPU SyncBatchNorm, fp64, deterministic towers) on this rank's rows of
    a fixed global batch, per entry of ``micro_batches`` (0: the plain step) from the same initialisation. Returns
    for each the losses, the last step's gradients, the parameters, the buffers and the optimizer state."""
    import groupvit
    from tests.helpers import deterministic_towers, make_batch
    from train.distributed import convert_sync_batchnorm
    from train.loop import train_step
    from train.optim import build_optimizer

    full = make_batch(world * local_batch, seed=5)
    rows = slice(rank * local_batch, (rank + 1) * local_batch)
    batch = {"images": full["images"][rows], "texts": full["texts"][rows]}
    out = []
    for micro in micro_batches:
        torch.manual_seed(0)
        model = convert_sync_batchnorm(groupvit.create_model("groupvit-tiny").double(), torch.device("cpu"))
        model = torch.nn.parallel.DistributedDataParallel(model)
        m = deterministic_towers(model.module)
        opt = build_optimizer(m, lr=1e-3)
        losses = [train_step(model, groupvit.GroupViTLoss(), opt, batch, micro_batch=micro)["loss"] for _ in range(2)]
        out.append(
            {
                "loss": losses,
                "grads": {n: p.grad.clone() for n, p in m.named_parameters()},
                "params": {n: p.detach().clone() for n, p in m.named_parameters()},
                "buffers": {n: b.clone() for n, b in m.named_buffers()},
                "opt": [{k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()],
            }
        )
    return out
