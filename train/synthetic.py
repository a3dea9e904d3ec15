"""Procedural "coloured shapes" dataset: the embedded default for training demos and CI (no downloads).

Each image (``size × size``, default 64) shows 1–3 non-overlapping shapes (circle, square, triangle, cross) in
**distinct** named colours on a grey, low-saturation textured background (smooth noise + pixel noise, random tint),
with per-object colour jitter and pixel noise so that no two images are alike. The caption names every object by
colour and shape in random order, e.g. ``"a red circle and a blue square"`` or
``"a picture of a green cross, an orange triangle and a purple circle"``. Generation costs ~2 ms per 64² sample.
The train shards also store the objects' phrases (``"green cross"``, ...) as the words of the multi-label prompts
(``"a photo of a green cross."``): the caption's noun phrases, where a POS tagger would keep only the shape nouns.
Optionally every n-th training image is the background alone, captioned ``"a grey background"`` (``empty_every``).

Ground truth for zero-shot segmentation: the object mask stores ``0`` for background and
``1 + colour_index * len(SHAPES) + shape_index`` per object pixel. :func:`class_names` / :func:`remap_mask` turn it
into one of three class vocabularies (index 0 is always ``"background"``, as in VOC):

* ``"color"`` (default): ``background, red, green, blue, yellow, purple, orange``. Colours are unique within an
  image, so every object is one segment and the query ("a photo of a red.") names exactly the attribute that tells
  objects apart. A tiny GroupViT learns colour–word grounding within minutes on a CPU, so this is the demo setting.
* ``"shape"``: ``background, circle, square, triangle, cross``: harder (shape must be learned); these are also the
  nouns the multi-label prompts pick from the captions (colours are tagged as adjectives).
* ``"object"``: the 24 ``"<colour> <shape>"`` combinations.

Everything is a pure function of ``(seed, split, index, size)``: sample ``i`` of a split is drawn from
``numpy.random.default_rng([seed, split_id, i])``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist
import webdataset as wds
from PIL import Image, ImageDraw

from train import rundir
from train.config import TrainConfig
from train.data import write_shards
from train.distributed import DistContext
from train.prompts import NOUNS_KEY, nouns_record

__all__ = [
    "COLORS",
    "EMPTY_CAPTION",
    "SHAPES",
    "KINDS",
    "SyntheticShards",
    "class_names",
    "generate",
    "load_val",
    "remap_mask",
    "prepare_synthetic",
    "write_synthetic_shards",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
KINDS = ("color", "shape", "object")
_SPLITS = {"train": 0, "val": 1}
_PHRASES = ("{}", "{}", "a picture of {}", "an image of {}", "{} on a grey background")
_VERSION = 2  # 2: train samples carry a .nouns member


def class_names(kind: str = "color") -> list[str]:
    """Class names for zero-shot segmentation; index 0 is ``"background"`` and matches :func:`remap_mask` values."""
    if kind == "color":
        return ["background", *COLORS]
    if kind == "shape":
        return ["background", *SHAPES]
    if kind == "object":
        return ["background", *(f"{c} {s}" for c in COLORS for s in SHAPES)]
    raise ValueError(f"class_names: kind must be one of {KINDS}, got {kind!r}")


def remap_mask(mask: np.ndarray, kind: str = "color") -> np.ndarray:
    """Object mask (``1 + colour * n_shapes + shape``) → ``kind`` class indices (uint8, same shape)."""
    n_s = len(SHAPES)
    ids = np.arange(1 + len(COLORS) * n_s)
    if kind == "color":
        lut = np.where(ids == 0, 0, (ids - 1) // n_s + 1)
    elif kind == "shape":
        lut = np.where(ids == 0, 0, (ids - 1) % n_s + 1)
    elif kind == "object":
        lut = ids
    else:
        raise ValueError(f"remap_mask: kind must be one of {KINDS}, got {kind!r}")
    if mask.dtype != np.uint8 or mask.max(initial=0) >= len(ids):
        raise ValueError(
            f"remap_mask: expected a uint8 object mask with values < {len(ids)}, "
            f"got {mask.dtype} max {mask.max(initial=0)}"
        )
    return lut.astype(np.uint8)[mask]


def _shape_polygon(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    elif shape == "square":
        h = r * 0.85  # similar area to the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=1)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=1)
    elif shape == "cross":
        t = r * 0.38
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=1)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey textured background, ``float32 [size, size, 3]``: smooth noise + pixel noise, slight tint."""
    grid = rng.integers(3, 7)
    coarse = rng.normal(0.0, 28.0, (grid, grid)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    base = rng.uniform(75, 185) + rng.uniform(-10, 10, 3)  # grey level + low-saturation tint [3]
    img = base[None, None, :] + smooth[:, :, None] + rng.normal(0.0, 9.0, (size, size, 3))
    return img.astype(np.float32)


EMPTY_CAPTION = "a grey background"


def _sample(
    seed: int, split: str, index: int, size: int, empty_every: int = 0
) -> tuple[Image.Image, str, np.ndarray, list[str]]:
    """One sample: image, caption, object-id mask and the objects' phrases (``"blue circle"``) in caption order.

    With ``empty_every = n > 0`` every n-th *training* sample (index n-1, 2n-1, ...) is a background alone,
    captioned :data:`EMPTY_CAPTION`, without phrases; the others are the same as with ``n = 0``."""
    if split == "train" and empty_every > 0 and index % empty_every == empty_every - 1:
        img = _background(np.random.default_rng([seed, len(_SPLITS), index]), size)
        return _rgb(img), EMPTY_CAPTION, np.zeros((size, size), dtype=np.uint8), []
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    img = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    n_obj = int(rng.integers(1, 4))
    colour_ids = rng.choice(len(COLORS), size=n_obj, replace=False)
    boxes: list[tuple[float, float, float, float]] = []
    names: list[str] = []  # "colour shape" per object
    for ci in colour_ids:
        si = int(rng.integers(len(SHAPES)))
        for _ in range(50):  # rejection-sample a spot whose box (plus a 1 px gap) overlaps no other object
            r = rng.uniform(0.11, 0.2) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            box = (cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        else:
            continue  # no room: leave this object out (and out of the caption)
        layer = Image.new("L", (size, size), 0)
        _shape_polygon(ImageDraw.Draw(layer), SHAPES[si], cx, cy, r)
        where = np.asarray(layer, dtype=bool)
        colour = np.asarray(list(COLORS.values())[ci], np.float32) + rng.uniform(-14, 14, 3)
        img[where] = colour + rng.normal(0.0, 7.0, (int(where.sum()), 3))
        mask[where] = 1 + int(ci) * len(SHAPES) + si
        boxes.append(box)
        names.append(f"{list(COLORS)[ci]} {SHAPES[si]}")
    order = rng.permutation(len(names))
    objects = [names[k] for k in order]
    parts = [f"{'an' if o[0] in 'aeiou' else 'a'} {o}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caption = _PHRASES[int(rng.integers(len(_PHRASES)))].format(listed)
    return _rgb(img), caption, mask, objects


def _rgb(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def _check(n: int, seed: int, size: int, split: str, empty_every: int = 0) -> None:
    if not isinstance(empty_every, int) or empty_every < 0:
        raise ValueError(f"synthetic: empty_every must be an int >= 0 (0: none), got {empty_every!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"synthetic: n must be an int >= 0, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"synthetic: seed must be an int >= 0, got {seed!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"synthetic: size must be an int >= 16, got {size!r}")
    if split not in _SPLITS:
        raise ValueError(f"synthetic: split must be one of {tuple(_SPLITS)}, got {split!r}")


def generate(
    n: int,
    seed: int = 0,
    size: int = 64,
    *,
    kind: str = "color",
    split: str = "train",
    start: int = 0,
    empty_every: int = 0,
) -> list[tuple[Image.Image, str, np.ndarray]]:
    """Samples ``start .. start+n-1`` of ``split``: ``(RGB image, caption, mask uint8 [size, size])``.

    ``mask`` holds ``kind`` class indices (see :func:`class_names`; ``kind="object"`` gives the raw object ids).
    ``empty_every``: see :func:`write_synthetic_shards`.
    """
    _check(n, seed, size, split, empty_every)
    class_names(kind)
    out = []
    for i in range(start, start + n):
        img, cap, obj, _ = _sample(seed, split, i, size, empty_every)
        out.append((img, cap, remap_mask(obj, kind)))
    return out


@dataclass(frozen=True)
class SyntheticShards:
    """Where :func:`write_synthetic_shards` put the data."""

    root: str
    train: list[str]  # train shard paths (jpg + txt)
    val: list[str]  # held-out shard paths (png + txt + mask.png with object ids)
    n_train: int
    n_val: int

    @property
    def train_pattern(self) -> str:
        """Brace pattern of the train shards, for :func:`train.data.build_train_loader`."""
        return _pattern(self.train)

    @property
    def val_pattern(self) -> str:
        return _pattern(self.val)


def _pattern(paths: list[str]) -> str:
    if not paths:
        return ""
    first, last = Path(paths[0]), Path(paths[-1])
    prefix = first.name.rsplit("-", 1)[0]
    return str(first.parent / f"{prefix}-{{{first.stem.rsplit('-', 1)[1]}..{last.stem.rsplit('-', 1)[1]}}}.tar")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    n_train: int = 10_000,
    n_val: int = 500,
    seed: int = 0,
    size: int = 64,
    shard_size: int = 1_000,
    empty_every: int = 0,
) -> SyntheticShards:
    """Write train shards ``train-NNNNNN.tar`` and held-out shards ``val-NNNNNN.tar`` plus ``manifest.json``.

    Idempotent: if ``manifest.json`` records the same parameters and all its shards exist, nothing is written.
    Otherwise everything is (re)generated and shards of an older manifest that are no longer listed are removed.
    Train shards hold ``jpg`` (quality 95) + ``txt`` + ``nouns`` (the objects' phrases, ``"blue circle"``, as the
    multi-label prompts' words: :func:`train.prompts.nouns_record`); val shards hold ``png`` + ``txt`` +
    ``mask.png`` (object ids,
    see :func:`remap_mask`). ``empty_every = n > 0``: every n-th training image shows no object and is captioned
    "a grey background" (negatives for every colour caption; the demo preset's setting, docs/demo.md §6).
    """
    _check(n_train, seed, size, "train", empty_every)
    _check(n_val, seed, size, "val")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"write_synthetic_shards: shard_size must be an int >= 1, got {shard_size!r}")
    root = Path(out_dir)
    manifest = root / "manifest.json"
    params = {
        "version": _VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "size": size,
        "shard_size": shard_size,
        "empty_every": empty_every,
    }
    old: dict = {}
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("params") == params and all((root / f).is_file() for f in old["train"] + old["val"]):
            return SyntheticShards(
                str(root), [str(root / f) for f in old["train"]], [str(root / f) for f in old["val"]], n_train, n_val
            )
    root.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # a crash while writing must not leave a valid-looking manifest

    def train_samples():
        for i in range(n_train):
            img, cap, _, objects = _sample(seed, "train", i, size, empty_every)
            yield f"train{i:08d}", img, cap, {NOUNS_KEY: nouns_record(cap, objects)}

    def val_samples():
        for i in range(n_val):
            img, cap, obj, _ = _sample(seed, "val", i, size)
            yield f"val{i:08d}", img, cap, {"mask.png": _png(obj)}

    train = write_shards(train_samples(), root, "train", maxcount=shard_size, image_format="jpg") if n_train else []
    val = write_shards(val_samples(), root, "val", maxcount=shard_size, image_format="png") if n_val else []
    names = {"train": [Path(p).name for p in train], "val": [Path(p).name for p in val]}
    for stale in set(old.get("train", []) + old.get("val", [])) - set(names["train"] + names["val"]):
        if "/" not in stale and stale.endswith(".tar"):
            (root / stale).unlink(missing_ok=True)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps({"params": params, **names, "class_names": class_names("object")}, indent=1))
    tmp.replace(manifest)
    return SyntheticShards(str(root), train, val, n_train, n_val)


def load_val(
    shards: SyntheticShards | str | os.PathLike, kind: str = "color"
) -> list[tuple[Image.Image, str, np.ndarray]]:
    """The held-out set as ``[(RGB image, caption, mask uint8 [H, W] of kind class indices)]`` in key order.

    Args:
        shards: the result of :func:`write_synthetic_shards`, or its ``out_dir`` (read via ``manifest.json``).
    """
    class_names(kind)
    if not isinstance(shards, SyntheticShards):
        root = Path(shards)
        meta = json.loads((root / "manifest.json").read_text())
        paths = [str(root / f) for f in meta["val"]]
    else:
        paths = shards.val
    out = []
    for s in wds.tariterators.tarfile_samples({"url": p} for p in paths):
        missing = [k for k in ("png", "mask.png", "txt") if k not in s]
        if missing:
            raise ValueError(
                f"{s.get('__url__')}: held-out sample {s.get('__key__')!r} lacks {missing}; the shard is "
                f"incomplete or was written by another process -- delete the folder to regenerate it"
            )
        img = Image.open(io.BytesIO(s["png"])).convert("RGB")
        mask = np.array(Image.open(io.BytesIO(s["mask.png"])), dtype=np.uint8)
        out.append((s["__key__"], img, s["txt"].decode("utf-8"), remap_mask(mask, kind)))
    out.sort(key=lambda t: t[0])
    return [(img, cap, mask) for _, img, cap, mask in out]


def prepare_synthetic(cfg: TrainConfig, ctx: DistContext | None = None) -> TrainConfig:
    """With ``data.synthetic_train > 0``: write the coloured-shapes shards on first use (rank 0 writes, the others
    wait; idempotent) and return a config whose ``train_shards`` include them (and ``dataset_length`` defaults to
    their size). Otherwise ``cfg`` unchanged."""
    d = cfg.data
    if d.synthetic_train <= 0:
        return cfg
    root = d.synthetic_dir or str(Path(cfg.output_dir) / "data")
    args = dict(
        n_train=d.synthetic_train,
        n_val=d.synthetic_val,
        seed=cfg.seed,
        size=d.img_size,
        shard_size=min(1000, max(1, d.synthetic_train // 8)),
        empty_every=d.synthetic_empty_every,
    )
    if ctx is None or ctx.is_main:
        with rundir.FolderLock(root, "synthetic-data folder", name=".synthetic.lock"):
            shards = write_synthetic_shards(root, **args)
    if ctx is not None and ctx.distributed:
        dist.barrier()
    if ctx is not None and not ctx.is_main:
        shards = write_synthetic_shards(root, **args)  # reads the manifest rank 0 wrote; writes nothing
    new = dataclasses.replace(
        d,
        train_shards=[*d.train_shards, shards.train_pattern],
        dataset_length=d.dataset_length or d.synthetic_train,
        synthetic_train=0,
    )
    return dataclasses.replace(cfg, data=new)
