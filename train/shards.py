"""Shard lists: the brace and glob patterns of webdataset shards (``--data.train_shards``, ``add-nouns``) expanded
into file names or URLs, one home for the loader (:mod:`train.data`) and the shard tools (:mod:`train.prompts`)."""

from __future__ import annotations

import glob
import os
import re
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
