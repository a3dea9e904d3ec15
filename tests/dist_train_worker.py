"""Helpers for tests/test_train_dist.py, run in separate processes.

* ``python -m torch.distributed.run --nproc_per_node 2 tests/dist_train_worker.py CONFIG OUT``: trains with
  :func:`train.loop.train` (which joins the gloo group from torchrun's environment) and saves this rank's history and
  final parameters to ``OUT/rank<r>.pt``.
* :func:`sync_bn_case`: run through ``tests.dist_utils.run_distributed``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def sync_bn_case(rank: int, world: int) -> dict:
    """CPUSyncBatchNorm on this rank's quarter of a fixed batch: output, input grad and affine grads."""
    from train.distributed import CPUSyncBatchNorm

    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 5, 1, generator=g, dtype=torch.float64) * 3 + 1  # [B, C, L], the global batch
    w = torch.randn(12, 5, 1, generator=g, dtype=torch.float64)  # upstream gradient weights
    n = x.shape[0] // world
    bn = CPUSyncBatchNorm(5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        bn.bias.copy_(torch.linspace(-1, 1, 5))
    xs = x[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    y = bn(xs)
    (y * w[rank * n : (rank + 1) * n]).sum().backward()
    return {
        "y": y.detach(),
        "gx": xs.grad,
        "gw": bn.weight.grad,
        "gb": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def main() -> None:
    import dataclasses

    from train.config import load_config
    from train.loop import train

    torch.set_num_threads(1)
    cfg_path, out = sys.argv[1], sys.argv[2]
    cfg = load_config(cfg_path)
    summary = train(cfg)
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "history": summary["history"],
            "world_size": summary["world_size"],
            "params": {k: v.detach().clone() for k, v in summary["model"].state_dict().items()},
            "bn_type": type(summary["model"].img_projector.linear_hidden[1]).__name__,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    assert dataclasses.is_dataclass(cfg)


if __name__ == "__main__":
    main()
