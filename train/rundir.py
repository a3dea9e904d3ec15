"""One run per folder: an exclusive lock, no silent overwrite, no leaked temp files, metrics that continue where the
checkpoint left off, a SIGTERM that stops at the next step with a checkpoint, and JSON without bare ``NaN``.

* :class:`FolderLock` -- ``<folder>/.lock`` (or another name) created atomically (``O_EXCL``) holding the
  owner's pid and host; a
  lock whose process no longer runs on this host is stale and taken over; released on exit.
* :func:`check_fresh_start` -- a run without ``resume`` refuses a folder that already holds a checkpoint unless
  ``overwrite=true``.
* :func:`clean_temp_files` -- removes ``.latest.pt.*.tmp`` left by a kill during a save (safe under the lock).
* :func:`truncate_metrics` -- drops ``metrics.jsonl`` records past the resumed step (they are re-run).
* :class:`StopSignal` -- SIGTERM (what a cluster scheduler sends before pre-emption) sets a flag the loop polls;
  data-loader workers ignore it (:func:`ignore_sigterm`).
* :func:`json_safe` -- non-finite floats -> ``None`` (``null``), so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from train.checkpoint import LATEST

LOCK = ".lock"
METRICS = "metrics.jsonl"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """Exclusive lock on ``folder`` (created if missing) for the lifetime of a ``with`` block.

    ``what`` names the folder in messages ("output directory", "synthetic-data folder"); ``name`` is the lock file's.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder", name: str = LOCK) -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / name
        self.held = False

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):  # second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone (killed), or unreadable
                    continue
                raise FolderLockedError(
                    f"{self.what} {self.folder} is in use by process {owner.get('pid')} on {owner.get('host')} "
                    f"(lock file {self.path}); wait for it to finish, choose another folder, or delete the lock "
                    f"file if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise FolderLockedError(f"cannot take the lock {self.path}: it keeps reappearing (another run starting?)")

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None  # half-written by a process killed between create and write

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner is None or owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_fresh_start(out_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """A fresh run (not ``resuming``) must not silently replace a finished or interrupted one."""
    out = Path(out_dir)
    if resuming or not (out / LATEST).exists():
        return
    if not (out / LATEST).is_file():
        raise IsADirectoryError(
            f"{out / LATEST} is not a file (a directory?): no checkpoint can be written there; "
            f"move it away or choose another output_dir"
        )
    if not overwrite:
        raise FileExistsError(
            f"output_dir {out} already holds a run ({out / LATEST}); continue it with resume=auto, "
            f"start over with overwrite=true (replaces its checkpoint and metrics), or choose "
            f"another output_dir"
        )
    (out / METRICS).unlink(missing_ok=True)


def clean_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temp files of interrupted checkpoint saves (``.latest.pt.*.tmp``); call with the folder's lock held."""
    stale = sorted(Path(out_dir).glob(f".{LATEST}.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def truncate_metrics(out_dir: str | os.PathLike, step: int) -> int:
    """Keep the ``metrics.jsonl`` records with ``step <= step`` (steps counted as completed steps, as the checkpoint
    and the progress bar count them): a resumed run re-runs the later ones. Returns how many were dropped."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, path)
    return dropped


def json_safe(obj: Any) -> Any:
    """Non-finite floats -> ``None`` throughout dicts and lists (JSON has no NaN / Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def ignore_sigterm(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loader workers: a SIGTERM sent to the whole process group (as schedulers do) is
    the main process's to handle (:class:`StopSignal`); a worker killed by it would abort the run before its
    checkpoint. Workers still end with the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignal:
    """While active, SIGTERM sets :attr:`requested` instead of killing the process (a second SIGTERM kills as
    usual). Installed only from the main thread; the previous handler is restored on exit."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal number received
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signum
        signal.signal(signum, self._previous if self._previous is not None else signal.SIG_DFL)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
