"""Data-parallel training on 2 CPU processes (gloo): a real ``torch.distributed.run`` launch of the trainer, and the
CPU SyncBatchNorm against a single-process BatchNorm over the whole batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training(tmp_path):
    from train.checkpoint import LATEST, load_training_checkpoint
    from train.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "data", n_train=64, n_val=0, size=32, shard_size=8)
    out = tmp_path / "run"
    out.mkdir()
    cfg = {
        "data": {
            "train_shards": [shards.train_pattern],
            "batch_size": 4,
            "num_workers": 0,
            "img_size": 32,
            "multi_label": 0,
            "shuffle_buffer": 16,
            "augment": False,
        },
        "model": {"preset": "groupvit-tiny"},
        "optim": {"steps_per_epoch": 2, "epochs": 1, "warmup_epochs": 0, "lr_ref_batch": 8},
        "output_dir": str(out),
        "log_interval": 1,
        "ckpt_interval": 1,
        "progress": False,
        "seed": 1,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(ROOT / "tests" / "dist_train_worker.py"),
        str(tmp_path / "cfg.json"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["bn_type"] == "CPUSyncBatchNorm"
    # DDP keeps the replicas identical after every step
    assert r0["params"].keys() == r1["params"].keys()
    for k, v in r0["params"].items():
        torch.testing.assert_close(r1["params"][k], v, rtol=0, atol=0, msg=k)
    l0, l1 = [h["loss"] for h in r0["history"]], [h["loss"] for h in r1["history"]]
    assert len(l0) == len(l1) == 2 and l0 != l1  # different local rows on each rank
    # rank 0 alone logs: one JSONL line per step, whose loss is the mean over both ranks
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r, a, b in zip(recs, l0, l1):
        assert r["loss"] == pytest.approx((a + b) / 2, rel=1e-9)
    # ... and checkpoints: the model equals the ranks' weights, the RNG states of both ranks are inside
    ck = load_training_checkpoint(out / LATEST)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # seeded seed + rank
    for k, v in r0["params"].items():
        torch.testing.assert_close(ck["model"][k], v, rtol=0, atol=0, msg=k)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", LATEST, "metrics.jsonl", "summary.json", "rank0.pt", "rank1.pt"]
    )
    assert proc.stderr.count("done: 2/2 steps") == 1  # one summary, from rank 0


def test_cpu_sync_batchnorm_matches_global_batchnorm():
    from tests.dist_train_worker import sync_bn_case

    res = run_distributed(sync_bn_case, 2, timeout=60)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(12, 5, 1, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    w = torch.randn(12, 5, 1, generator=g, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        bn.bias.copy_(torch.linspace(-1, 1, 5))
    y = bn(x)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in res]), y.detach())
    # input gradients include the path through the global statistics (both ranks' upstream gradients)
    torch.testing.assert_close(torch.cat([r["gx"] for r in res]), x.grad)
    # parameter gradients are per-rank partial sums; DDP would average them -> the global grad / world
    torch.testing.assert_close(res[0]["gw"] + res[1]["gw"], bn.weight.grad)
    torch.testing.assert_close(res[0]["gb"] + res[1]["gb"], bn.bias.grad)
    for r in res:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)
