"""Shard lists: the brace and glob patterns of webdataset shards (``--data.train_shards``, ``add-nouns``) expanded
into file names or URLs, one home for the loader (:mod:`train.data`) and the shard tools (:mod:`train.prompts`)."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from typing import Sequence

import braceexpand


def _is_local(url: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith("file:")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand one pattern or a list of patterns (several datasets) into one shard list, in order.

    A pattern is brace-expanded (``gcc-{000000..000436}.tar``); a local pattern holding glob characters
    (``*``, ``?``, ``[...]``) is then matched against the file system (sorted), so ``data/*.tar`` works too.

    Raises:
        ValueError: no pattern given; FileNotFoundError: a local pattern none of whose shards exists.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not patterns:
        raise ValueError("build_train_loader: no shard pattern given")
    out: list[str] = []
    for pat in patterns:
        pat = os.fspath(pat)
        shards = []
        for s in braceexpand.braceexpand(pat):
            path = s.removeprefix("file:")
            if _is_local(s) and glob.has_magic(path):
                shards.extend(sorted(glob.glob(path)))
            else:
                shards.append(s)
        local = [s for s in shards if _is_local(s)]
        if not shards or (local and not any(os.path.exists(s.removeprefix("file:")) for s in local)):
            raise FileNotFoundError(
                f"build_train_loader: no shard of pattern {pat!r} exists (patterns are "
                f"brace-expanded, e.g. 'dir/name-{{000000..000099}}.tar', or globbed, e.g. "
                f"'dir/*.tar')"
            )
        out.extend(shards)
    return out


def _stats_successes(shard: str) -> int | None:
    """Samples of ``shard`` from the ``<shard>_stats.json`` that img2dataset writes beside it, if present."""
    path = re.sub(r"\.tar$", "", shard) + "_stats.json"
    try:
        with open(path) as f:
            n = json.load(f).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n >= 0 else None


def _count_samples(shard: str) -> int:
    """Distinct sample keys in a tar shard (headers only; member contents are skipped, not read)."""
    keys = set()
    with tarfile.open(shard) as tar:
        for m in tar:
            if m.isfile():
                base = os.path.basename(m.name)
                keys.add(os.path.join(os.path.dirname(m.name), base.split(".", 1)[0]))
    return len(keys)


def estimate_samples(urls: str | Sequence[str], max_scan: int = 8) -> int | None:
    """Estimated samples in the local shards of ``urls`` (``None`` for remote shards or unreadable ones).

    Shards with an img2dataset ``_stats.json`` count its ``successes``; of the others up to ``max_scan`` are
    counted (tar headers) and the rest extrapolated by file size. An estimate, meant for sanity checks only.
    """
    shards = [s.removeprefix("file:") for s in expand_urls(urls)]
    if not shards or not all(_is_local(s) and os.path.isfile(s) for s in shards):
        return None
    total, unknown = 0, []
    for s in shards:
        n = _stats_successes(s)
        if n is None:
            unknown.append(s)
        else:
            total += n
    if unknown:
        step = max(1, len(unknown) // max_scan)
        sample = unknown[::step][:max_scan]
        try:
            counted = sum(_count_samples(s) for s in sample)
        except (OSError, tarfile.TarError):  # an unreadable shard: no estimate (the loader reports it)
            return None
        size = sum(os.path.getsize(s) for s in sample)
        total += round(counted * sum(os.path.getsize(s) for s in unknown) / size) if size else 0
    return total


def dataset_length_warning(dataset_length: int | None, urls: str | Sequence[str]) -> str | None:
    """A warning when ``data.dataset_length`` is off by more than 2x from the shards' estimated sample count."""
    if dataset_length is None or not urls:
        return None
    est = estimate_samples(urls)
    if not est or dataset_length / 2 <= est <= dataset_length * 2:
        return None
    return (
        f"data.dataset_length is {dataset_length:,} but the shards hold about {est:,} samples (estimated from "
        f"the tar files); epochs, warm-up and the lr schedule follow dataset_length: set "
        f"data.dataset_length={est} (or optim.steps_per_epoch) for your data"
    )
