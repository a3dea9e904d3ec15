"""Multi-label noun prompts for GroupViT's multi-label contrastive loss (docs/groupvit.md §9, "Text transforms").

For each caption, every time it is loaded:

1. word-tokenize (``nltk.word_tokenize(text, preserve_line=True)``: needs no punkt data) and POS-tag it with
   NLTK's averaged-perceptron tagger;
2. keep words tagged NN, NNS, NNP, VB, VBD, VBG, VBN, VBP, VBZ (verbs included, NNPS excluded), de-duplicated in
   caption order;
3. choose ``min(K, n)`` of them uniformly without replacement, each filled into a template drawn uniformly from the
   80 CLIP ImageNet templates;
4. pad to K prompts with the raw caption.

The tagger reads ``taggers/averaged_perceptron_tagger_eng/`` (three JSON files) from the NLTK data path; point
``NLTK_DATA`` at the folder that contains ``taggers/``. All randomness comes from a caller-supplied
:class:`random.Random`, so the data loader can make prompts reproducible per sample.

Tagging costs ~0.65 ms per caption, so steps 1-2 can be done once, off the training hot path::

    python -m train.prompts add-nouns 'data/gcc-train-{000000..000436}.tar' [--workers 8]

adds a ``<key>.nouns`` member (JSON ``{"words": [...], "caption_sha1": ...}``) to every captioned sample, shard by
shard (each rewritten atomically; shards already done are skipped, so an interrupted run resumes). The loader uses
these words when present and the caption matches (templates and word choice are still drawn per step) and tags
on the fly otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from typing import Any, Sequence

from train.shards import expand_urls

__all__ = [
    "IMAGENET_TEMPLATES",
    "KEEP_TAGS",
    "NOUNS_KEY",
    "add_nouns",
    "candidate_words",
    "load_tagger",
    "make_prompts",
    "nouns_record",
    "parse_nouns",
]

NOUNS_KEY = "nouns"  # webdataset member extension of the precomputed candidate words

KEEP_TAGS = frozenset({"NN", "NNS", "NNP", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ"})

# The 80 prompt templates of OpenAI CLIP's ImageNet zero-shot evaluation ("full" set; CLIP repository, MIT).
IMAGENET_TEMPLATES: list[str] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]
assert len(IMAGENET_TEMPLATES) == 80

_TAGGER_DIR = "taggers/averaged_perceptron_tagger_eng"


@lru_cache(maxsize=1)
def load_tagger() -> Any:
    """The NLTK averaged-perceptron tagger, loaded once per process (``nltk.pos_tag`` would reload it per call).

    Raises:
        LookupError: with setup instructions when the tagger files are not on the NLTK data path.
    """
    import nltk.data
    from nltk.tag.perceptron import PerceptronTagger

    env = os.environ.get("NLTK_DATA")
    if env:  # NLTK reads NLTK_DATA once at import time; honour a value set later too
        for p in reversed(env.split(os.pathsep)):
            if p and p not in nltk.data.path:
                nltk.data.path.insert(0, p)
    try:
        return PerceptronTagger()
    except (LookupError, OSError, ValueError) as exn:
        raise LookupError(
            f"multi-label prompts need NLTK's averaged-perceptron POS tagger ({_TAGGER_DIR}/ with its three "
            f".json files), which was not found on the NLTK data path {list(nltk.data.path)}. Set the environment "
            f"variable NLTK_DATA to the folder that contains 'taggers/' (in this project's CI layout: "
            f"NLTK_DATA=../shared/data/nltk_data), or fetch it once with `python -m train.prompts download-tagger`, "
            f"or train without noun prompts: data.multi_label=0. Original error: {exn}"
        ) from None


def candidate_words(caption: str) -> list[str]:
    """Distinct words of ``caption`` tagged as a noun (NN, NNS, NNP) or verb (VB*), in caption order."""
    if not isinstance(caption, str):
        raise TypeError(f"candidate_words: caption must be str, got {type(caption).__name__}")
    from nltk.tokenize import word_tokenize

    tagged = load_tagger().tag(word_tokenize(caption, preserve_line=True))
    return list(dict.fromkeys(word for word, tag in tagged if tag in KEEP_TAGS))


def make_prompts(caption: str, k: int, rng: random.Random, words: Sequence[str] | None = None) -> list[str]:
    """K prompts for ``caption``: ``min(k, n)`` distinct candidate words in random templates, padded with the caption.

    Args:
        caption: the raw caption.
        k: number of prompts (GroupViT uses 3); ``k = 0`` gives ``[]``.
        rng: source of all randomness (word choice, then one template per word).
        words: precomputed ``candidate_words(caption)`` (from a ``.nouns`` member), or ``None`` to tag now.
    Returns:
        ``list[str]`` of length ``k``.
    """
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"make_prompts: k must be an int >= 0, got {k!r}")
    if not isinstance(rng, random.Random):
        raise TypeError(f"make_prompts: rng must be a random.Random, got {type(rng).__name__}")
    if k == 0:
        return []
    words = candidate_words(caption) if words is None else list(words)
    chosen = rng.sample(words, min(k, len(words)))
    prompts = [rng.choice(IMAGENET_TEMPLATES).format(w) for w in chosen]
    return prompts + [caption] * (k - len(prompts))


# ---------------------------------------------------------------------------------------------------------------
# Precomputed nouns in the shards
# ---------------------------------------------------------------------------------------------------------------
def _sha1(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def nouns_record(caption: str, words: Sequence[str] | None = None) -> bytes:
    """The ``.nouns`` member for ``caption`` (stripped as the loader strips it); ``words`` default to
    :func:`candidate_words` (a dataset that knows its entities, such as :mod:`train.synthetic`, passes them)."""
    caption = caption.strip()
    words = candidate_words(caption) if words is None else [str(w) for w in words]
    return json.dumps({"words": words, "caption_sha1": _sha1(caption)}).encode("utf-8")


def parse_nouns(data: bytes, caption: str) -> list[str] | None:
    """Words of a ``.nouns`` member, or ``None`` (tag on the fly) when it is unreadable or for another caption."""
    try:
        rec = json.loads(data.decode("utf-8"))
        words = rec["words"]
        ok = rec.get("caption_sha1") == _sha1(caption) and all(isinstance(w, str) for w in words)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return list(words) if ok else None


def _groups(members: list[tarfile.TarInfo]) -> list[tuple[str, list[tarfile.TarInfo]]]:
    """Consecutive members sharing a webdataset key (path up to the first '.' of the file name), in order."""
    out: list[tuple[str, list[tarfile.TarInfo]]] = []
    for m in members:
        d, base = os.path.split(m.name)
        key = os.path.join(d, base.split(".", 1)[0]) if m.isfile() else None
        if out and key is not None and out[-1][0] == key:
            out[-1][1].append(m)
        else:
            out.append((key, [m]))
    return out


def _add_nouns_to_shard(path: str) -> tuple[str, int, bool]:
    """Rewrite ``path`` with a ``.nouns`` member after each captioned sample; ``(path, samples tagged, changed)``."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        groups = _groups(members)
        todo = []
        for key, ms in groups:
            exts = {os.path.basename(m.name).split(".", 1)[1] if "." in os.path.basename(m.name) else "" for m in ms}
            text = next((m for m in ms if os.path.basename(m.name).split(".", 1)[-1] in ("txt", "text")), None)
            todo.append(text is not None and key is not None and NOUNS_KEY not in exts)
        if not any(todo):
            return path, 0, False
        tmp = f"{path}.nouns-{os.getpid()}.tmp"
        n = 0
        try:
            with tarfile.open(tmp, "w", format=tar.format) as out:
                for (key, ms), need in zip(groups, todo):
                    caption = None
                    for m in ms:
                        data = tar.extractfile(m).read() if m.isfile() else None
                        out.addfile(m, io.BytesIO(data) if data is not None else None)
                        if data is not None and os.path.basename(m.name).split(".", 1)[-1] in ("txt", "text"):
                            caption = caption if caption is not None else data.decode("utf-8", errors="replace")
                    if need and caption is not None:
                        rec = nouns_record(caption)
                        info = tarfile.TarInfo(f"{key}.{NOUNS_KEY}")
                        info.size, info.mtime, info.mode = len(rec), ms[0].mtime, ms[0].mode
                        out.addfile(info, io.BytesIO(rec))
                        n += 1
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old or the new shard, never a partial one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path, n, True


def add_nouns(patterns: Sequence[str], workers: int = 1) -> dict[str, int]:
    """Add ``.nouns`` members to every shard of ``patterns`` (brace or glob patterns), ``workers`` shards at a time.

    Returns:
        ``{"shards": …, "rewritten": …, "samples": …}`` (shards already complete are left untouched).
    """
    shards = expand_urls(list(patterns))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"add-nouns: {len(missing)} shard(s) do not exist, e.g. {missing[0]!r}")
    load_tagger()  # fail fast with instructions
    done = {"shards": len(shards), "rewritten": 0, "samples": 0}
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Inline() as pool:
        for path, n, changed in pool.map(_add_nouns_to_shard, shards):
            done["rewritten"] += changed
            done["samples"] += n
            print(f"{path}: {'added nouns to ' + str(n) + ' samples' if changed else 'already done'}", flush=True)
    return done


class _Inline:
    """A stand-in for a process pool with one worker: ``map`` in this process."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.prompts", description="Precompute noun prompts in shards.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add-nouns", help="add a .nouns member (candidate words) to each captioned sample")
    add.add_argument("shards", nargs="+", help="shard patterns: brace ('x-{000000..000009}.tar') or glob ('*.tar')")
    add.add_argument("--workers", type=int, default=1, help="shards processed in parallel (processes)")
    get = sub.add_parser(
        "download-tagger",
        help="fetch NLTK's POS tagger once (network; ~/nltk_data by default, which NLTK searches without NLTK_DATA)",
    )
    get.add_argument("--dir", default=None, help="download folder (then set NLTK_DATA to it)")
    args = ap.parse_args(argv)
    if args.cmd == "download-tagger":
        import nltk

        folder = os.path.expanduser(args.dir or os.path.join("~", "nltk_data"))
        if not nltk.download(_TAGGER_DIR.split("/")[1], download_dir=folder, quiet=True, raise_on_error=False):
            print(
                f"download-tagger: could not fetch {_TAGGER_DIR} into {folder} (offline?); copy the folder "
                f"'taggers/' from a machine that has it and set NLTK_DATA",
                file=sys.stderr,
            )
            return 2
        print(f"download-tagger: {folder}/{_TAGGER_DIR}" + (f" (set NLTK_DATA={folder})" if args.dir else ""))
        return 0
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    try:
        done = add_nouns(args.shards, workers=args.workers)
    except (FileNotFoundError, LookupError, ValueError, tarfile.TarError) as exn:
        print(f"add-nouns: {exn}", file=sys.stderr)
        return 2
    print(f"add-nouns: {done['samples']} samples tagged in {done['rewritten']} of {done['shards']} shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
