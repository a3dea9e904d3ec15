"""Worker for the 2-process gloo test of ``contrastive_loss`` (tests/test_contrastive_loss.py).

Every rank builds the same global batch from a fixed seed, takes its rank-major slice, runs the reference and the
fused kernel under the process group and saves losses and gradients to ``out_dir/rank{r}.pt``; the test process does
all the asserting. Run by ``torch.multiprocessing.spawn(run, args=(world, init_file, out_dir, cases), nprocs=world)``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def global_inputs(
    b: int, d: int, k: int, world: int, theta: float, dtype: torch.dtype, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch ``image [W*B, D]``, ``text [W*B*K, D]`` (rank-major) and ``theta`` (0-dim)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(world * b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(world * b * k, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(txt + img.repeat_interleave(k, 0), dim=-1)
    return img.to(dtype), txt.to(dtype), torch.tensor(theta, dtype=dtype)


def run(rank: int, world: int, init_file: str, out_dir: str, cases: list[dict]) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module defines its kernels
    from kernels import reference
    from kernels.contrastive_loss import contrastive_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results: dict = {}
        for c in cases:
            img, txt, theta = global_inputs(c["B"], c["D"], c["K"], world, c["theta"], c["dtype"], c["seed"])
            b, bk = c["B"], c["B"] * c["K"]
            local = (img[rank * b : (rank + 1) * b], txt[rank * bk : (rank + 1) * bk], theta)
            for impl_name, impl in (("reference", reference.contrastive_loss), ("kernel", contrastive_loss)):
                for weighting in ("ones", "ranked"):  # upstream gradient 1 on every rank, or rank + 1
                    xs = [t.clone().requires_grad_(True) for t in local]
                    loss = impl(*xs, num_prompts=c["K"])
                    w = 1.0 if weighting == "ones" else float(rank + 1)
                    (w * loss).backward()
                    results[(c["name"], impl_name, weighting)] = (loss.detach(), *(x.grad for x in xs))
        # non-finite input on rank 1 only: every rank must raise (no rank left hanging in a collective)
        img, txt, theta = global_inputs(3, 16, 1, world, 1.0, torch.float32, 0)
        mine = img[rank * 3 : (rank + 1) * 3].clone()
        if rank == 1:
            mine[0, 0] = float("nan")
        try:
            contrastive_loss(mine, txt[rank * 3 : (rank + 1) * 3], theta)
            results["nonfinite"] = "no error"
        except ValueError as e:
            results["nonfinite"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
