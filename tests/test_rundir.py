"""One run per output folder (lock, no silent overwrite), no leaked temp files, metrics without repeated steps after
a resume, strict JSON, data counts over all segments of a resumed run, and SIGTERM: checkpoint and a clean exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train import _run_cfg, shards  # noqa: F401  (shards: the tiny webdataset fixture)
from train import rundir
from train.checkpoint import LATEST, load_training_checkpoint
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(shards: str, out: Path, **kw):  # noqa: F811 (a parameter, not the fixture)
    return _run_cfg(shards, out, threads=1, **kw)  # one thread: fast and steady on a shared 2-core machine


def _strict_json(line: str):
    def bad(token: str):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=bad)


def _metrics(out: Path) -> list[dict]:
    return [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_folder_lock_is_exclusive_and_detects_stale_locks(tmp_path):
    with rundir.FolderLock(tmp_path, "output directory") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(rundir.FolderLockedError, match=f"output directory .* in use by process {os.getpid()}"):
            rundir.FolderLock(tmp_path, "output directory").acquire()
    assert not (tmp_path / rundir.LOCK).exists()  # released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with rundir.FolderLock(tmp_path):  # a killed run's lock is taken over
        pass
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(rundir.FolderLockedError, match="another-machine"):  # cannot tell: refuse
        rundir.FolderLock(tmp_path).acquire()


def test_fresh_run_never_overwrites_a_run(shards, tmp_path):  # noqa: F811
    from train.loop import train
    from train.synthetic import prepare_synthetic

    out = tmp_path / "run"
    first = train(_cfg(shards, out, max_steps=2))
    before = (out / LATEST).read_bytes()
    with pytest.raises(FileExistsError, match="resume=auto.*overwrite=true"):
        train(_cfg(shards, out, max_steps=1))
    assert (out / LATEST).read_bytes() == before and len(_metrics(out)) == 2
    with rundir.FolderLock(out):  # another live run holds the folder
        with pytest.raises(rundir.FolderLockedError, match="in use"):
            train(_cfg(shards, out, resume="auto"))
    (out / f".{LATEST}.abc123.tmp").write_bytes(b"half a checkpoint")  # left by a kill during a save
    again = train(_cfg(shards, out, max_steps=1, overwrite=True))
    assert again["steps"] == 1 and first["steps"] == 2
    assert [r["step"] for r in _metrics(out)] == [1]  # the old run's records are gone with it
    assert not list(out.glob("*.tmp")) and not (out / rundir.LOCK).exists()
    # the synthetic-data folder has its own lock
    data = tmp_path / "data"
    cfg = load_config(
        overrides={
            "data.synthetic_train": 8,
            "data.synthetic_dir": str(data),
            "data.img_size": 32,
            "output_dir": str(out),
        }
    )
    with rundir.FolderLock(data, "synthetic-data folder", name=".synthetic.lock"):
        with pytest.raises(rundir.FolderLockedError, match="synthetic-data folder"):
            prepare_synthetic(cfg)


def test_resume_repeats_no_metrics_and_counts_all_data(shards, tmp_path):  # noqa: F811
    from train.loop import train

    full = train(_cfg(shards, tmp_path / "full"))  # 2 epochs of 4 steps
    out = tmp_path / "cut"
    train(_cfg(shards, out, max_steps=5))  # stops in epoch 1
    shutil.copy(out / LATEST, tmp_path / "at5.pt")
    train(_cfg(shards, out, resume="auto", max_steps=7))
    shutil.copy(tmp_path / "at5.pt", out / LATEST)  # as if killed after logging steps 6, 7 but before saving them
    rest = train(_cfg(shards, out, resume="auto"))
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 9))  # no step twice; completed steps, as the bar counts
    assert all(r["loss_ml"] is None for r in recs)  # multi_label 0: NaN written as null
    for key in ("samples", "used", "batches"):
        assert rest["data"][key] == full["data"][key], key
    assert rest["data"]["batches"] == 8
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda t: pytest.fail(t))
    assert summary["data"]["batches"] == 8


def test_max_steps_must_be_positive():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_steps must be >= 1"):
            load_config(overrides={"max_steps": bad})


def test_sigterm_checkpoints_and_exits_cleanly(shards, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = [
        f"data.train_shards=[{shards}]",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.img_size=32",
        "data.multi_label=0",
        "data.augment=false",
        "model.preset=groupvit-tiny",
        "optim.steps_per_epoch=4",
        "optim.epochs=100",
        "optim.lr_ref_batch=8",
        f"output_dir={out}",
        "log_interval=1",
        "ckpt_interval=1000",
        "progress=false",
        "threads=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # to the whole group, data worker included, as a scheduler does
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err
    summary = json.loads((out / "summary.json").read_text())
    ck = load_training_checkpoint(out / LATEST)
    assert summary["stopped_by"] == "signal" and 2 <= ck["step"] == summary["steps"] < 400
    assert _metrics(out)[-1]["step"] == ck["step"]
    assert not (out / rundir.LOCK).exists() and not list(out.glob("*.tmp"))


def test_cli_names_the_folder_problem_in_one_line(shards, tmp_path, capsys):  # noqa: F811
    from train.__main__ import main

    out = tmp_path / "run"
    (out / LATEST).mkdir(parents=True)
    args = [f"data.train_shards=[{shards}]", "optim.steps_per_epoch=2", f"output_dir={out}", "threads=1"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not a file" in err and "Traceback" not in err and len(err.splitlines()) == 1
    (out / LATEST).rmdir()
    (out / LATEST).write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "resume=auto" in err and len(err.splitlines()) == 1
