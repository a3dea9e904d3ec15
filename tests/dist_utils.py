"""Run a function on W real ``torch.distributed`` (gloo) processes on this CPU and collect the results."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo processes; returns the per-rank results (must be picklable
    module-level functions and torch-serialisable results)."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(
            _worker, args=(world, _free_port(), fn, args, d), nprocs=world, join=False, start_method="spawn"
        )
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as e:
            msgs = [torch.load(os.path.join(d, f)).get("error", "") for f in sorted(os.listdir(d))]
            raise RuntimeError(f"distributed run failed: {e}\n" + "\n".join(m for m in msgs if m)) from e
        return [torch.load(os.path.join(d, f"{r}.pt"))["ok"] for r in range(world)]
