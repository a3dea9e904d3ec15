"""Image–text training data: webdataset shards → augmented, tokenised, deterministic, resumable batches
(docs/groupvit.md §9).

Public API::

    write_shards(samples, out_dir, prefix, maxcount=1000) -> list[str]
    loader = build_train_loader(urls, batch_size=..., num_workers=..., ...)   # -> TrainLoader
    loader.set_epoch(epoch, start_batch=0); for batch in loader: ...           # or loader.iter_epoch(epoch, start)
    batch = {"images": FloatTensor [B, 3, S, S], "texts": LongTensor [B, 1 + K, L], "keys": list[str]}
    loader.stats -> DataStats  (samples read, skipped-and-counted bad data, batches)

Stream, per (rank, worker) "consumer" (``C = world_size * max(num_workers, 1)`` consumers in all):

1. **shards**: all shard patterns (brace-expanded, then globbed; several datasets mixed by concatenation) are
   shuffled with ``Random(seed, epoch, cycle)`` — the same order on every rank — and consumer ``c = rank * W +
   worker`` takes
   ``shards[c::C]`` (node split, then worker split). With fewer shards than consumers every consumer reads all
   shards and keeps raw samples ``i % C == c`` instead, so tiny datasets still work and stay disjoint.
2. **read** local shards with :func:`_local_tar_samples` (webdataset's grouping of members into samples, at a
   fraction of its cost), other urls (``pipe:``, ``http://``, ...) with webdataset's reader; unreadable, truncated
   or missing shards are warned about (first few), counted once per pass and skipped (samples before the damage
   are kept).
3. **filter** samples without an image (``jpg|jpeg|png``) or caption (``txt|text``), or with an empty caption; a
   ``.nouns`` member (``python -m train.prompts add-nouns``) supplies the caption's candidate words, else they are
   tagged on the fly.
4. **shuffle** raw samples (encoded bytes) through a buffer of ``shuffle_buffer`` (seeded by consumer and epoch;
   0 or 1 = no shuffling); like webdataset's it starts yielding after 100 samples and grows to full size.
5. **decode** the image (:mod:`groupvit.imageio`: 8-bit RGB by value, a pixel cap); corrupt images and images above
   ``max_pixels`` are counted, logged with shard and key, and skipped. With ``augment_on="gpu"`` this step decodes
   only the crop's region (:func:`train.transforms.decode_region`: libjpeg-turbo, DCT-scaled where it can).
6. **batch** ``batch_size`` good samples (never a partial batch); the i-th sample of the consumer's stream gets its
   own ``Random((worker_seed, epoch, i))`` for crop, augmentation and prompts, with
   ``worker_seed = num_workers * rank + worker_id + seed`` (docs/groupvit.md §8; ``num_workers`` counts as 1
   when 0).
   Errors inside the transform or tokenizer are bugs, not bad data, and propagate. ``augment_on="cpu"``: the
   worker runs the whole :class:`train.transforms.TrainTransform`; ``"gpu"``: it ships the crops' ``uint8``
   regions un-resized (one flat buffer plus a geometry row each) and each sample's drawn parameters, and
   :class:`TrainLoader` resizes and augments the batch with :class:`train.gpu_augment.DeviceAugment` on ``device``
   in the main process.

Epochs: with ``epoch_len`` (batches per rank per epoch, the training setting) shards repeat forever (reshuffled per
cycle) and an epoch is exactly ``epoch_len`` batches; with ``epoch_len=None`` an epoch is one pass over this rank's
shards (ranks may then get different batch counts: use ``epoch_len`` for distributed training).

Resume: the stream is a pure function of (urls, seed, epoch, rank, world_size, num_workers, batch_size, ...), and
``start_batch=n`` yields exactly batches ``n, n+1, …`` of that epoch. With ``epoch_len`` set, torch's DataLoader
takes batches from workers strictly round-robin (global batch ``g`` is batch ``g // W`` of worker ``g % W``), so
on resume worker ``w`` plays the part of worker ``(w + n) % W`` and drops that stream's first ``(w + n) // W``
batches itself: skipped batches are read and their images decoded (so bad-sample filtering stays identical) but not
augmented or tokenised. With ``epoch_len=None`` a worker may run dry first, breaking round-robin, so the first
``n`` batches are produced and discarded in the main process (exact, but full cost). Resuming needs the same
``num_workers`` and ``batch_size`` as the interrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import re
import tarfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from groupvit.imageio import DEFAULT_MAX_PIXELS, ImageTooLarge, open_image, to_rgb
from groupvit.tokenizer import CONTEXT_LENGTH, get_tokenizer
from train.config import TrainConfig
from train.distributed import DistContext
from train.gpu_augment import DeviceAugment
from train.prompts import NOUNS_KEY, load_tagger, make_prompts, parse_nouns
from train.rundir import ignore_sigterm
from train.shards import expand_urls
from train.transforms import TrainTransform, decode_region

__all__ = [
    "IMAGE_KEYS",
    "TEXT_KEYS",
    "DataStats",
    "TrainLoader",
    "build_loader",
    "build_train_loader",
    "expand_urls",
    "write_shards",
]

log = logging.getLogger(__name__)

AUGMENT_ON = ("cpu", "gpu")
IMAGE_KEYS = ("jpg", "jpeg", "png")
TEXT_KEYS = ("txt", "text")
_MAX_WARNINGS = 10  # per kind of problem and consumer; everything is still counted


# ---------------------------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------------------------
def _encode_image(image: Image.Image | bytes, fmt: str) -> tuple[str, bytes]:
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return ("png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"), data
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        img = image if image.mode in ("RGB", "L") else image.convert("RGB")
        if fmt == "jpg":
            img.save(buf, format="JPEG", quality=95)
        elif fmt == "png":
            img.save(buf, format="PNG")
        else:
            raise ValueError(f"write_shards: image_format must be 'jpg' or 'png', got {fmt!r}")
        return fmt, buf.getvalue()
    raise TypeError(f"write_shards: image must be a PIL image, encoded bytes or None, got {type(image).__name__}")


def write_shards(
    samples: Iterable[tuple],
    out_dir: str | os.PathLike,
    prefix: str,
    maxcount: int = 1000,
    *,
    image_format: str = "jpg",
) -> list[str]:
    """Write ``(key, image, caption[, extras])`` samples to ``out_dir/prefix-000000.tar``, … (webdataset layout).

    Args:
        samples: ``key`` (str without '.' or '/'), ``image`` (PIL image → encoded as ``image_format``; encoded
            bytes → stored as ``.png`` if PNG else ``.jpg``; ``None`` → no image member), ``caption`` (str →
            ``.txt``; ``None`` → no caption member), optional ``extras`` dict ``{ext: bytes | str}``.
        out_dir: created if missing.
        prefix: shard name prefix.
        maxcount: samples per shard.
        image_format: ``"jpg"`` (quality 95) or ``"png"`` for PIL images.
    Returns:
        The shard paths written, in order. Tar members get mtime 0, so the same samples give identical bytes.
    """
    if maxcount < 1:
        raise ValueError(f"write_shards: maxcount must be >= 1, got {maxcount}")
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(os.fspath(out_dir), prefix).replace("%", "%%") + "-%06d.tar"
    paths: list[str] = []
    writer = wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=paths.append, mtime=0)
    try:
        for item in samples:
            if len(item) not in (3, 4):
                raise ValueError(f"write_shards: expected (key, image, caption[, extras]), got {len(item)} fields")
            key, image, caption = item[:3]
            if not isinstance(key, str) or not key or "." in key or "/" in key:
                raise ValueError(f"write_shards: key must be a non-empty str without '.' or '/', got {key!r}")
            sample: dict[str, Any] = {"__key__": key}
            if image is not None:
                ext, data = _encode_image(image, image_format)
                sample[ext] = data
            if caption is not None:
                sample["txt"] = caption.encode("utf-8")
            for ext, val in (item[3] if len(item) == 4 else {}).items():
                sample[ext] = val.encode("utf-8") if isinstance(val, str) else bytes(val)
            writer.write(sample)
    finally:
        writer.close()
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DataStats:
    """Counters of one consumer (or a sum of them). Bad data is skipped, never fatal."""

    samples: int = 0  # raw samples read from shards (of this consumer)
    used: int = 0  # good samples that went into batches (including batches skipped on resume)
    batches: int = 0  # batches produced (including batches skipped on resume)
    missing_images: int = 0  # no jpg/jpeg/png member
    missing_captions: int = 0  # no txt/text member
    empty_captions: int = 0  # caption empty after stripping whitespace
    corrupt_images: int = 0  # image bytes PIL cannot decode
    oversized_images: int = 0  # images above the pixel cap (max_pixels: decompression bombs), not decoded
    shard_errors: int = 0  # shards that could not be opened/read to the end (truncated, missing, bad tar)

    @property
    def skipped(self) -> int:
        """Samples dropped for bad data."""
        return (
            self.missing_images
            + self.missing_captions
            + self.empty_captions
            + self.corrupt_images
            + self.oversized_images
        )

    def __add__(self, other: "DataStats") -> "DataStats":
        return DataStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "skipped": self.skipped}


# ---------------------------------------------------------------------------------------------------------------
# The per-consumer stream
# ---------------------------------------------------------------------------------------------------------------
class _Problems:
    """Counts bad data into ``stats`` and logs the first few of each kind."""

    def __init__(self, stats: DataStats, consumer: int):
        self.stats, self.consumer, self.seen = stats, consumer, {}
        self.current_url: str | None = None  # shard being read (set by the url generator)
        self.failed_urls: set[str | None] = set()  # shards already counted in this cycle

    def __call__(self, kind: str, msg: str) -> None:
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        n = self.seen[kind] = self.seen.get(kind, 0) + 1
        if n <= _MAX_WARNINGS:
            tail = " (further ones are only counted)" if n == _MAX_WARNINGS else ""
            log.warning("data consumer %d: %s: %s%s", self.consumer, kind, msg, tail)

    def shard_handler(self, exn: Exception) -> bool:
        # webdataset may report one broken shard twice (member read, then the tar iterator): count it once
        if self.current_url not in self.failed_urls:
            self.failed_urls.add(self.current_url)
            self("shard_errors", f"{self.current_url}: {type(exn).__name__}: {str(exn.args[0])[:300]}")
        return True  # continue with the next shard


def _shuffled(items: Iterator[Any], bufsize: int, rng: random.Random, initial: int = 100) -> Iterator[Any]:
    """Buffer shuffle: starts yielding after ``min(initial, bufsize)`` items, grows the buffer to ``bufsize``."""
    if bufsize <= 1:
        yield from items
        return
    initial = min(initial, bufsize)
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) < bufsize:  # take a second item while filling so the buffer grows
            nxt = next(items, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


_TAR_REGULAR = (b"0", b"\0", b"7")  # regular file types (tarfile.REGULAR_TYPES less GNU sparse)
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata members
_TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))


def _local_tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """The samples of a local tar shard, as webdataset's ``tarfile_samples`` groups them (consecutive members
    with the same key → ``{"__key__", "__url__", ext: bytes}``; ustar prefixes, pax and GNU long names; directories,
    links and ``__*__`` members skipped) at a fraction of the cost of tarfile's stream mode. Damage raises
    ``tarfile.ReadError`` after the samples before it were yielded."""
    sample: dict[str, Any] | None = None
    try:
        for name, data in _local_tar_members(path):
            match = _TAR_KEY.match(name)
            if _TAR_META.match(name) or match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": path}
            if ext in sample:
                raise tarfile.ReadError(f"{path}: {name}: duplicate file name in the shard")
            sample[ext] = data
    except Exception:
        if sample is not None:
            yield sample  # complete or partial, as webdataset would: the filters downstream judge it
        raise
    if sample is not None:
        yield sample


def _local_tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of a local tar file's regular members."""
    long_name: str | None = None
    with open(path, "rb") as f:
        while True:
            hdr = f.read(512)
            if not hdr and f.tell() == 0:
                raise tarfile.ReadError(f"{path}: empty file")
            if not hdr or hdr == bytes(512):
                break  # end of the archive
            if len(hdr) < 512:
                raise tarfile.ReadError(f"{path}: unexpected end of data in a member header")
            try:
                size, kind = tarfile.nti(hdr[124:136]), hdr[156:157]
                ok = tarfile.nti(hdr[148:156]) == sum(hdr[:148]) + 256 + sum(hdr[156:])  # checksum field as spaces
            except tarfile.HeaderError:  # not octal numbers
                ok = False
            if not ok:
                raise tarfile.ReadError(f"{path}: bad tar header at byte {f.tell() - 512}")
            data, pad = f.read(size), -size % 512
            if len(data) < size or len(f.read(pad)) < pad:  # a cut in the padding is damage too (as for tarfile)
                raise tarfile.ReadError(f"{path}: unexpected end of data in a member")
            if kind == b"x":  # pax header: records "<len> key=value\n"; "path" names the next member
                pos = 0
                while pos < len(data):
                    n = int(data[pos : data.index(b" ", pos)])
                    key, _, val = data[data.index(b" ", pos) + 1 : pos + n - 1].partition(b"=")
                    long_name = val.decode("utf-8") if key == b"path" else long_name
                    pos += n
                continue
            if kind == b"L":  # GNU long name
                long_name = tarfile.nts(data, "utf-8", "surrogateescape")
                continue
            name = long_name or tarfile.nts(hdr[:100], "utf-8", "surrogateescape")
            if long_name is None and hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = tarfile.nts(hdr[345:500], "utf-8", "surrogateescape") + "/" + name
            long_name = None
            if kind in _TAR_REGULAR:
                yield name, data


def _why_undecodable(exn: Exception) -> str:
    """One line on a decoder failure, without PIL's ``<_io.BytesIO object at 0x...>`` stand-in for the file."""
    msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(exn))[:200]
    return f"{type(exn).__name__}: {msg}"


class _CpuPath:
    """``augment_on=cpu``: decode fully in the worker, then ``transform(PIL image, rng) -> float [3, S, S]``."""

    def __init__(self, transform: Callable[[Image.Image, random.Random], torch.Tensor], max_pixels: int | None):
        self.transform, self.max_pixels = transform, max_pixels

    def decode(self, data: bytes, rng: random.Random) -> Image.Image:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's palette-transparency notes
            return to_rgb(open_image(data, self.max_pixels))

    def collate(self, batch: list[tuple[Image.Image, random.Random]]) -> dict[str, torch.Tensor]:
        return {"images": torch.stack([self.transform(img, rng) for img, rng in batch])}  # [B, 3, S, S] float32


class _GpuPath:
    """``augment_on=gpu``: decode the crop's region in the worker (:func:`train.transforms.decode_region`) and draw
    the per-sample parameters of :class:`train.gpu_augment.DeviceAugment`; the main process resizes and augments
    the batch on the device."""

    def __init__(self, device_aug: DeviceAugment, max_pixels: int | None):
        self.device_aug, self.max_pixels = device_aug, max_pixels

    def decode(self, data: bytes, rng: random.Random) -> tuple[np.ndarray, tuple[float, ...]]:
        aug = self.device_aug
        return decode_region(data, aug.img_size, rng, augment=aug.augment, max_pixels=self.max_pixels)

    def collate(
        self, batch: list[tuple[tuple[np.ndarray, tuple[float, ...]], random.Random]]
    ) -> dict[str, torch.Tensor]:
        flat, regions = self.device_aug.pack_regions([region for region, _ in batch])
        params = np.stack([self.device_aug.sample_params(rng) for _, rng in batch])
        return {
            "images": flat,  # uint8 [sum h w 3]: the crops' regions, un-resized
            "regions": regions,  # float64 [B, 6]: (h, w, box x0, y0, x1, y1)
            "aug_params": torch.from_numpy(params),  # float64 [B, P]
        }


class _ShardStream(IterableDataset):
    """IterableDataset yielding finished batches (dicts) of one consumer; see the module docstring."""

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        context_length: int,
        multi_label: int,
        transform: _CpuPath | _GpuPath,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        repeat: bool,
    ):
        super().__init__()
        self.shards, self.batch_size, self.context_length, self.multi_label = (
            shards,
            batch_size,
            context_length,
            multi_label,
        )
        self.transform, self.shuffle_buffer, self.seed = transform, shuffle_buffer, seed
        self.rank, self.world_size, self.repeat = rank, world_size, repeat
        self.epoch = 0
        self.start_batch = 0  # global batch index to start from (used only when repeat=True)

    def _raw_samples(self, consumer: int, n_consumers: int, problems: _Problems) -> Iterator[dict[str, Any]]:
        split_shards = len(self.shards) >= n_consumers
        cycle = 0
        while True:
            order = list(self.shards)
            random.Random(f"shards/{self.seed}/{self.epoch}/{cycle}").shuffle(order)
            mine = order[consumer::n_consumers] if split_shards else order
            st = problems.stats
            before = st.samples - st.missing_images - st.missing_captions - st.empty_captions
            problems.failed_urls = set()
            for i, sample in enumerate(self._shard_samples(mine, problems)):
                if split_shards or i % n_consumers == consumer:
                    st.samples += 1
                    yield sample  # the caption filter downstream counts it synchronously
            if not self.repeat:
                return
            if st.samples - st.missing_images - st.missing_captions - st.empty_captions == before:
                raise RuntimeError(
                    f"data consumer {consumer} of {n_consumers}: a full pass over its shards "
                    f"{mine[:3]}... gave no sample with image and caption (too few samples for "
                    f"this many ranks x workers, or all bad?); stats {st}"
                )
            cycle += 1

    @staticmethod
    def _shard_samples(urls: list[str], problems: _Problems) -> Iterator[dict[str, Any]]:
        """The shards' samples in order; a shard that cannot be read to the end is counted (``shard_errors``) after
        its samples before the damage. Local files: :func:`_local_tar_samples`; other urls (``pipe:``, ``http://``,
        ...): webdataset's reader."""
        for u in urls:
            problems.current_url = u
            if not _is_local(u):
                yield from wds.tariterators.tarfile_samples([{"url": u}], handler=problems.shard_handler)
                continue
            try:
                yield from _local_tar_samples(u)
            except Exception as exn:  # noqa: BLE001 - a damaged or missing shard is bad data, counted
                problems.shard_handler(exn)

    @staticmethod
    def _with_caption(
        samples: Iterator[dict[str, Any]], problems: _Problems
    ) -> Iterator[tuple[str, str, bytes, str, list[str] | None]]:
        """``(key, shard, image bytes, caption, precomputed candidate nouns or None)`` of the good samples."""
        for s in samples:
            key = str(s.get("__key__", "?"))
            img = next((s[k] for k in IMAGE_KEYS if k in s), None)
            txt = next((s[k] for k in TEXT_KEYS if k in s), None)
            if img is None:
                problems("missing_images", f"{key} has no {'/'.join(IMAGE_KEYS)} ({s.get('__url__')})")
            elif txt is None:
                problems("missing_captions", f"{key} has no {'/'.join(TEXT_KEYS)} ({s.get('__url__')})")
            else:
                caption = txt.decode("utf-8", errors="replace").strip()
                if not caption:
                    problems("empty_captions", f"{key} ({s.get('__url__')})")
                else:
                    nouns = parse_nouns(s[NOUNS_KEY], caption) if NOUNS_KEY in s else None
                    yield key, str(s.get("__url__")), img, caption, nouns

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader takes batches round-robin from worker 0. Global batch g of an epoch is batch g // nw of the
        # stream of worker g % nw. Resuming at batch n, worker w therefore plays the part of worker (w + n) % nw,
        # from that stream's batch (w + n) // nw on (only in repeat mode, where no worker runs dry).
        start = self.start_batch if self.repeat else 0
        wid, skip = (wid + start) % nw, (wid + start) // nw
        consumer, n_consumers = self.rank * nw + wid, self.world_size * nw
        worker_seed = nw * self.rank + wid + self.seed
        if info is not None:  # seed library RNGs in workers only (never reseed the main process)
            s = worker_seed * 100_003 + self.epoch
            random.seed(s)
            np.random.seed(s % 2**32)
            torch.manual_seed(s)
        stats = DataStats()
        problems = _Problems(stats, consumer)
        raw = self._raw_samples(consumer, n_consumers, problems)
        good = _shuffled(
            self._with_caption(raw, problems), self.shuffle_buffer, random.Random(f"shuffle/{worker_seed}/{self.epoch}")
        )
        tok = get_tokenizer()
        pending: list[tuple[random.Random, str, Any, str, list[str] | None]] = []
        n_decoded = 0
        for idx, (key, url, data, caption, nouns) in enumerate(good):
            # the i-th good sample's own stream: crop (gpu path) then augmentation, then prompts
            rng = random.Random(f"sample/{worker_seed}/{self.epoch}/{idx}")
            try:
                img = self.transform.decode(data, rng)
            except ImageTooLarge as exn:
                problems("oversized_images", f"{url}: sample {key}: {exn}")
                continue
            except Exception as exn:  # noqa: BLE001 - any decoder failure means a corrupt image
                problems("corrupt_images", f"{url}: sample {key}: {_why_undecodable(exn)}")
                if n_decoded == 0 and stats.corrupt_images >= 10_000:  # a repeating stream would spin forever
                    raise RuntimeError(
                        f"data consumer {consumer}: the first {stats.corrupt_images} images were "
                        f"all undecodable; stats {stats}"
                    ) from None
                continue
            n_decoded += 1
            pending.append((rng, key, img, caption, nouns))
            if len(pending) < self.batch_size:
                continue
            batch, pending = pending, []
            stats.used += len(batch)
            stats.batches += 1
            if skip > 0:
                skip -= 1
                continue
            images = self.transform.collate([(im, rng) for rng, _, im, _, _ in batch])  # augmentation draws first
            texts = []
            for rng, _, _, cap, nouns in batch:
                texts.extend([cap] + make_prompts(cap, self.multi_label, rng, words=nouns))
            ids = tok(texts, context_length=self.context_length)  # [B * (1 + K), L]
            yield {
                **images,  # images [B, 3, S, S] (cpu path); or flat regions, their rows, aug_params (gpu path)
                "texts": ids.view(len(batch), 1 + self.multi_label, self.context_length),  # [B, 1 + K, L]
                "keys": [k for _, k, _, _, _ in batch],
                "_stats": (consumer, dataclasses.replace(stats)),
            }
        yield {"_stats": (consumer, dataclasses.replace(stats))}  # final counts (one-pass mode), no batch


# ---------------------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------------------
class TrainLoader:
    """Iterable over training batches of one rank; see the module docstring for order and resume semantics.

    ``set_epoch(epoch, start_batch)`` selects what the next ``iter()`` yields; after a completed epoch the loader
    moves on to ``epoch + 1`` from batch 0 by itself. ``stats`` sums the counters over all epochs iterated so far
    (as last reported by each worker). With ``device_augment`` (``augment_on=gpu``) the workers' ``uint8`` batches
    are moved to ``device`` and augmented there (in the main process) before they are yielded.
    """

    def __init__(
        self,
        dataset: _ShardStream,
        *,
        num_workers: int,
        epoch_len: int | None,
        pin_memory: bool,
        prefetch_factor: int | None,
        device_augment: DeviceAugment | None = None,
        device: torch.device | str = "cpu",
    ):
        self.dataset, self.num_workers, self.epoch_len = dataset, num_workers, epoch_len
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.device_augment, self.device = device_augment, torch.device(device)
        self.epoch, self.start_batch = 0, 0
        self._done = DataStats()  # stats of finished iterations
        self._live: dict[int, DataStats] = {}  # latest snapshot per consumer of the running iteration

    @property
    def batch_size(self) -> int:
        return self.dataset.batch_size

    @property
    def stats(self) -> DataStats:
        total = self._done
        for s in self._live.values():
            total = total + s
        return total

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (seeds shard order, shuffling and augmentation) and the first batch index to yield."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"TrainLoader.set_epoch: epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        if self.epoch_len is not None and start_batch > self.epoch_len:
            raise ValueError(f"TrainLoader.set_epoch: start_batch {start_batch} > epoch_len {self.epoch_len}")
        self.epoch, self.start_batch = epoch, start_batch

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """``set_epoch(epoch, start_batch)`` then iterate."""
        self.set_epoch(epoch, start_batch)
        return iter(self)

    def __len__(self) -> int:
        if self.epoch_len is None:
            raise TypeError("TrainLoader has no length without epoch_len (one pass over the shards)")
        return self.epoch_len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds, start = self.dataset, self.start_batch
        ds.epoch = self.epoch
        ds.start_batch = start if ds.repeat else 0
        kw: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kw["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=ignore_sigterm,
            **kw,
        )  # SIGTERM: the main process checkpoints and stops
        self._live = {}
        n = start if ds.repeat else 0
        discard = 0 if ds.repeat else start
        completed = False
        try:
            if self.epoch_len is not None and n >= self.epoch_len:
                completed = True
                return
            for batch in loader:
                consumer, snap = batch.pop("_stats")
                self._live[consumer] = snap
                if "images" not in batch:  # a worker's final counters
                    continue
                if discard > 0:
                    discard -= 1
                    continue
                if self.device_augment is not None and "aug_params" in batch:
                    aug, flat = self.device_augment, batch["images"].to(self.device, non_blocking=True)
                    images = aug.crop_resize(flat, batch.pop("regions"))  # uint8 [B, 3, S, S]
                    batch["images"] = aug.apply(images, batch.pop("aug_params"))
                yield batch
                n += 1
                if self.epoch_len is not None and n >= self.epoch_len:
                    break
            completed = True
        finally:
            self._done = self.stats
            self._live = {}
            if completed:
                self.epoch, self.start_batch = self.epoch + 1, 0


def build_train_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    num_workers: int = 0,
    context_length: int = CONTEXT_LENGTH,
    multi_label: int = 0,
    img_size: int = 224,
    augment: bool = True,
    shuffle_buffer: int = 10_000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch_len: int | None = None,
    transform: Callable[[Image.Image, random.Random], torch.Tensor] | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    augment_on: str = "cpu",
    device: torch.device | str = "cpu",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> TrainLoader:
    """Training loader over webdataset shards (see the module docstring).

    Args:
        urls: a brace pattern (``".../gcc-train-{000000..000436}.tar"``) or a list of them (datasets mixed).
        batch_size: samples per batch on this rank (no partial batches).
        num_workers: DataLoader worker processes (0 = in-process).
        context_length: token sequence length L.
        multi_label: K prompts per caption (needs the NLTK tagger; 0 disables).
        img_size: output side S; augment: full train augmentation (else resize + center crop).
        shuffle_buffer: samples per consumer in the shuffle buffer (0 = no sample shuffling).
        seed, rank, world_size: seeding and distributed split.
        epoch_len: batches per epoch per rank (stream repeats forever), or ``None`` for one pass over the shards.
        transform: ``f(img, rng) -> [3, S, S]`` replacing ``TrainTransform(img_size, augment)`` (cpu path only).
        pin_memory, prefetch_factor: passed to torch's DataLoader.
        augment_on: ``"cpu"`` (workers run the whole timm-semantics transform) or ``"gpu"`` (workers decode and crop
            to uint8; flip, RandAugment, normalisation and erasing run batched on ``device``, see
            :mod:`train.gpu_augment`).
        device: where ``augment_on="gpu"`` augments (and leaves) the images.
        max_pixels: pixel cap per image; larger ones are skipped and counted (``oversized_images``), ``None``: none.
    Returns:
        a :class:`TrainLoader` yielding ``{"images": [B,3,S,S] float32, "texts": [B,1+K,L] int64, "keys": list}``.
    """
    for name, val, lo in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("context_length", context_length, 2),
        ("multi_label", multi_label, 0),
        ("shuffle_buffer", shuffle_buffer, 0),
        ("world_size", world_size, 1),
    ):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"build_train_loader: {name} must be an int >= {lo}, got {val!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"build_train_loader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if epoch_len is not None and (not isinstance(epoch_len, int) or epoch_len < 1):
        raise ValueError(f"build_train_loader: epoch_len must be None or an int >= 1, got {epoch_len!r}")
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"build_train_loader: augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
    if augment_on == "gpu" and transform is not None:
        raise ValueError("build_train_loader: a custom transform runs on the CPU: use augment_on='cpu' with it")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"build_train_loader: max_pixels must be None or an int >= 1, got {max_pixels!r}")
    shards = expand_urls(urls)
    get_tokenizer()  # build once here so forked workers inherit it
    if multi_label > 0:
        load_tagger()  # fail fast (with instructions) if the NLTK tagger is missing
    device_aug = DeviceAugment(img_size, augment) if augment_on == "gpu" else None
    path = (
        _GpuPath(device_aug, max_pixels)
        if device_aug is not None
        else _CpuPath(transform or TrainTransform(img_size, augment), max_pixels)
    )
    ds = _ShardStream(
        shards,
        batch_size=batch_size,
        context_length=context_length,
        multi_label=multi_label,
        transform=path,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        repeat=epoch_len is not None,
    )
    return TrainLoader(
        ds,
        num_workers=num_workers,
        epoch_len=epoch_len,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        device_augment=device_aug,
        device=device,
    )


def build_loader(cfg: TrainConfig, ctx: DistContext, *, steps_per_epoch: int, context_length: int) -> Any:
    """This rank's :class:`train.data.TrainLoader`: ``steps_per_epoch`` batches per epoch, deterministic given
    (seed, epoch, rank, world size, workers), so ``iter_epoch(epoch, start_batch)`` resumes exactly."""
    d = cfg.data
    return build_train_loader(
        d.train_shards,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        context_length=context_length,
        multi_label=d.multi_label,
        img_size=d.img_size,
        augment=d.augment,
        shuffle_buffer=d.shuffle_buffer,
        seed=cfg.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        epoch_len=steps_per_epoch,
        pin_memory=ctx.device.type == "cuda",
        prefetch_factor=4 if d.num_workers > 0 else None,
        augment_on=d.augment_on,
        device=ctx.device,
        max_pixels=d.max_pixels,
    )
