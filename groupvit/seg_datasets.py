"""Segmentation benchmarks for zero-shot evaluation: dataset loaders, mIoU, and ``evaluate``.

Datasets, in their standard on-disk layouts (the ones mmsegmentation and GroupViT's evaluation read):

* **PASCAL VOC 2012** (``voc``): ``<root>/JPEGImages/<id>.jpg``, ``<root>/SegmentationClass/<id>.png`` (palette PNG,
  indices 0..20, 255 = boundary), ids in ``<root>/ImageSets/Segmentation/<split>.txt``; ``root`` is ``VOC2012``
  (or ``VOCdevkit`` containing it). Background threshold 0.95.
* **PASCAL Context, 59 classes + background** (``context``): ``<root>/JPEGImages``,
  ``<root>/SegmentationClassContext/<id>.png`` (indices 0..59, 0 = background), ids in
  ``<root>/ImageSets/SegmentationContext/<split>.txt``; ``root`` is ``VOC2010``. Background threshold 0.35.
* **COCO-Object, 80 classes + background** (``coco``): ``<root>/images/<split>/<id>.jpg`` and
  ``<root>/annotations/<split>/<id>_instanceTrainIds.png`` (0 = background, 1..80, 255 = ignore), every image of
  the folder, sorted; split ``val2017``. Background threshold 0.95.

Class names are the ones GroupViT's evaluation prompts with (VOC/Context rename diningtable, pottedplant, tvmonitor
to table, plant, monitor; Context also aeroplane to airplane).

mIoU (docs/groupvit.md §10.2): intersections and unions are summed per class over the whole dataset (pixels
labelled 255
ignored), IoU = I / U per class, mIoU = mean over classes with U > 0; a class predicted but absent from the ground
truth scores 0. Command line: ``python -m groupvit.seg_datasets --dataset voc --root VOC2012 --checkpoint CKPT``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from groupvit import ops
from groupvit.cli import CliError, check_backend, check_device, load_model, seg_settings
from groupvit.segmentation import SegConfig, ZeroShotSegmenter, load_image

__all__ = [
    "COCO_OBJECT_CLASSES",
    "CONTEXT_CLASSES",
    "DATASETS",
    "EvalResult",
    "IoUResult",
    "MeanIoU",
    "SegDataset",
    "VOC_CLASSES",
    "build_dataset",
    "coco_object",
    "evaluate",
    "pascal_context",
    "pascal_voc",
    "voc_colormap",
]

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "plant",
    "sheep",
    "sofa",
    "train",
    "monitor",
)

CONTEXT_CLASSES: tuple[str, ...] = (
    "background",
    "airplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "plant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "monitor",
    "wall",
    "water",
    "window",
    "wood",
)

COCO_OBJECT_CLASSES: tuple[str, ...] = (
    "background",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
assert len(VOC_CLASSES) == 21 and len(CONTEXT_CLASSES) == 60 and len(COCO_OBJECT_CLASSES) == 81


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map ``uint8 [n, 3]``: bits of the label spread over the high bits of R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


# ---- datasets --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    id: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # uint8 [H, W]: class index, 255 = ignore


@dataclass
class SegDataset:
    """A list of (id, image file, label file) with the dataset's class names (index 0 = background) and its
    background threshold; ``dataset[i]`` reads one :class:`Sample`."""

    name: str
    class_names: tuple[str, ...]
    bg_thresh: float
    items: list[tuple[str, Path, Path]]
    rgb_labels_ok: bool = False  # VOC: also accept RGB colour-coded label PNGs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        sid, img_path, lab_path = self.items[i]
        image = load_image(img_path)
        label = read_label(lab_path, len(self.class_names), rgb_ok=self.rgb_labels_ok)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{self.name} sample {sid!r}: label {lab_path} is {label.shape[1]}x{label.shape[0]} "
                f"but image {img_path} is {image.shape[1]}x{image.shape[0]}"
            )
        return Sample(sid, image, label)

    def subset(self, n: int) -> "SegDataset":
        return SegDataset(self.name, self.class_names, self.bg_thresh, self.items[:n], self.rgb_labels_ok)

    def seg_config(self, **overrides) -> SegConfig:
        """The official protocol for this dataset (slide 448/224, its background threshold) plus overrides."""
        return SegConfig(bg_thresh=self.bg_thresh).replace(**overrides)


def read_label(path: Path, num_classes: int, *, rgb_ok: bool = False) -> np.ndarray:
    """Class-index map ``uint8 [H, W]`` of a label PNG (palette or grey indices; RGB VOC colours if ``rgb_ok``).
    Values must be in ``[0, num_classes)`` or 255."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except Exception as e:
        raise ValueError(f"cannot read label {str(path)!r}: {type(e).__name__}: {e}") from e
    if mode == "RGB" and rgb_ok:
        cmap = voc_colormap().astype(np.int64)
        code = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
        lut = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(cmap)}
        keys, inv = np.unique(code, return_inverse=True)
        bad = [hex(int(k)) for k in keys if int(k) not in lut]
        if bad:
            raise ValueError(f"label {str(path)!r}: RGB colours {bad[:5]} are not VOC palette colours")
        arr = np.array([lut[int(k)] for k in keys], dtype=np.uint8)[inv].reshape(code.shape)
    elif arr.ndim != 2:
        raise ValueError(
            f"label {str(path)!r}: expected a single-channel (palette or grey) PNG, got mode {mode} "
            f"with shape {arr.shape}"
        )
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"label {str(path)!r}: values {np.unique(arr[bad])[:5].tolist()} outside 0..{num_classes - 1} "
            f"(and not the ignore index {IGNORE_INDEX})"
        )
    return arr.astype(np.uint8)


def _need(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}. Expected layout:\n{layout}")
    return path


def _from_split(
    name: str,
    root: Path,
    classes: tuple[str, ...],
    bg: float,
    img_dir: str,
    ann_dir: str,
    split_file: str,
    layout: str,
    rgb_ok: bool = False,
) -> SegDataset:
    ids = [ln.strip() for ln in _need(root / split_file, "split file", layout).read_text().splitlines() if ln.strip()]
    items = []
    for sid in ids:
        items.append(
            (
                sid,
                _need(root / img_dir / f"{sid}.jpg", "image", layout),
                _need(root / ann_dir / f"{sid}.png", "label", layout),
            )
        )
    return SegDataset(name, classes, bg, items, rgb_ok)


def pascal_voc(root: str | Path, split: str = "val") -> SegDataset:
    """PASCAL VOC 2012 segmentation (21 classes incl. background, bg_thresh 0.95)."""
    root = Path(root)
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012").is_dir():
        root = root / "VOC2012"
    layout = (
        "  <root>/JPEGImages/<id>.jpg\n  <root>/SegmentationClass/<id>.png\n"
        f"  <root>/ImageSets/Segmentation/{split}.txt"
    )
    return _from_split(
        "voc",
        root,
        VOC_CLASSES,
        0.95,
        "JPEGImages",
        "SegmentationClass",
        f"ImageSets/Segmentation/{split}.txt",
        layout,
        rgb_ok=True,
    )


def pascal_context(root: str | Path, split: str = "val") -> SegDataset:
    """PASCAL Context, 59 classes + background (labels 0..59, bg_thresh 0.35)."""
    root = Path(root)
    if not (root / "JPEGImages").is_dir() and (root / "VOC2010").is_dir():
        root = root / "VOC2010"
    layout = (
        "  <root>/JPEGImages/<id>.jpg\n  <root>/SegmentationClassContext/<id>.png (indices 0..59)\n"
        f"  <root>/ImageSets/SegmentationContext/{split}.txt"
    )
    return _from_split(
        "context",
        root,
        CONTEXT_CLASSES,
        0.35,
        "JPEGImages",
        "SegmentationClassContext",
        f"ImageSets/SegmentationContext/{split}.txt",
        layout,
    )


def coco_object(root: str | Path, split: str = "val2017") -> SegDataset:
    """COCO-Object, 80 classes + background (``*_instanceTrainIds.png``, bg_thresh 0.95): every image of
    ``images/<split>`` with its annotation, sorted by name."""
    root = Path(root)
    suffix = "_instanceTrainIds.png"
    layout = f"  <root>/images/{split}/<id>.jpg\n  <root>/annotations/{split}/<id>{suffix}"
    img_dir = _need(root / "images" / split, "image folder", layout)
    ann_dir = _need(root / "annotations" / split, "annotation folder", layout)
    items = [(p.stem, p, _need(ann_dir / f"{p.stem}{suffix}", "label", layout)) for p in sorted(img_dir.glob("*.jpg"))]
    if not items:
        raise FileNotFoundError(f"no .jpg images in {img_dir}. Expected layout:\n{layout}")
    return SegDataset("coco", COCO_OBJECT_CLASSES, 0.95, items)


DATASETS = {"voc": pascal_voc, "context": pascal_context, "coco": coco_object}


def build_dataset(name: str, root: str | Path, split: str | None = None) -> SegDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](root) if split is None else DATASETS[name](root, split)


# ---- mIoU ------------------------------------------------------------------------------------------------------


@dataclass
class IoUResult:
    """Dataset-level metrics. ``iou`` / ``acc`` per class are NaN where undefined (no union / no ground truth)."""

    class_names: tuple[str, ...]
    iou: np.ndarray  # [C]
    acc: np.ndarray  # [C] per-class pixel accuracy (recall)
    miou: float
    macc: float
    aacc: float  # overall pixel accuracy
    n_images: int

    def table(self) -> str:
        """Per-class IoU / accuracy table (percent), then the summary row."""
        w = max(12, max(len(n) for n in self.class_names))
        fmt = lambda v: "   nan" if math.isnan(v) else f"{100 * v:6.2f}"  # noqa: E731
        lines = [f"{'class':<{w}}    IoU    Acc", "-" * (w + 15)]
        lines += [f"{n:<{w}} {fmt(i)} {fmt(a)}" for n, i, a in zip(self.class_names, self.iou, self.acc)]
        lines += [
            "-" * (w + 15),
            f"{'mean':<{w}} {fmt(self.miou)} {fmt(self.macc)}",
            f"aAcc {fmt(self.aacc)}   images {self.n_images}",
        ]
        return "\n".join(lines)


class MeanIoU:
    """Accumulates the confusion matrix over a dataset (ground truth rows, prediction columns)."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"MeanIoU: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
        if len(self.class_names) != num_classes:
            raise ValueError(f"MeanIoU: {len(self.class_names)} class names for {num_classes} classes")
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.n_images = 0

    def update(self, pred, target) -> None:
        """Add one image (or a batch) of predictions and ground truth of equal shape (arrays or tensors)."""
        pred, target = _numpy(pred), _numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"MeanIoU.update: prediction {pred.shape} and ground truth {target.shape} differ")
        valid = target != self.ignore_index
        p, t = pred[valid].astype(np.int64), target[valid].astype(np.int64)
        c = self.num_classes
        for arr, what in ((p, "prediction"), (t, "ground truth")):
            if arr.size and (arr.min() < 0 or arr.max() >= c):
                raise ValueError(
                    f"MeanIoU.update: {what} values {np.unique(arr[(arr < 0) | (arr >= c)])[:5].tolist()} "
                    f"outside 0..{c - 1}"
                )
        self.confusion += np.bincount(t * c + p, minlength=c * c).reshape(c, c)
        self.n_images += 1 if pred.ndim <= 2 else pred.shape[0]

    def compute(self) -> IoUResult:
        cm = self.confusion.astype(np.float64)
        inter = np.diag(cm)
        gt, pr = cm.sum(axis=1), cm.sum(axis=0)
        union = gt + pr - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, np.nan)
            acc = np.where(gt > 0, inter / gt, np.nan)
        total = cm.sum()
        return IoUResult(
            self.class_names,
            iou,
            acc,
            _nanmean(iou),
            _nanmean(acc),
            float(inter.sum() / total) if total else math.nan,
            self.n_images,
        )


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ---- evaluation ------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: IoUResult
    seconds: float  # wall time of the image loop (loading + inference + metric)
    images_per_s: float
    predictions: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def summary(self) -> str:
        m = self.metrics
        return (
            f"mIoU {100 * m.miou:.2f}  mAcc {100 * m.macc:.2f}  aAcc {100 * m.aacc:.2f}  "
            f"({m.n_images} images, {self.seconds:.1f} s, {self.images_per_s:.2f} images/s)"
        )


def evaluate(
    model,
    dataset: SegDataset,
    cfg: SegConfig | None = None,
    progress: bool = True,
    *,
    images_per_step: int = 4,
    limit: int | None = None,
    keep_predictions: bool = False,
) -> EvalResult:
    """Zero-shot mIoU of ``model`` on ``dataset`` (default protocol: :meth:`SegDataset.seg_config`).

    Images are processed ``images_per_step`` at a time so their windows share forward passes
    (``cfg.batch_size`` windows each). ``images_per_s`` excludes the one-off class-embedding computation.
    """
    cfg = cfg or dataset.seg_config()
    if not cfg.background:
        raise ValueError("evaluate: the benchmark datasets label background as class 0; use SegConfig(background=True)")
    if limit is not None and limit < 1:
        raise ValueError(f"evaluate: limit must be >= 1 images (or None for all), got {limit}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"evaluate: dataset {dataset.name!r} is empty")
    seg = ZeroShotSegmenter(model, dataset.class_names[1:], cfg)
    metric = MeanIoU(len(dataset.class_names), class_names=dataset.class_names)
    preds: dict[str, np.ndarray] | None = {} if keep_predictions else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"{dataset.name} ({cfg.mode})", dynamic_ncols=True)
    t0 = time.perf_counter()
    for start in range(0, n, images_per_step):
        samples = [dataset[i] for i in range(start, min(start + images_per_step, n))]
        for s, p in zip(samples, seg.predict_batch([s.image for s in samples])):
            metric.update(p, s.label)
            if preds is not None:
                preds[s.id] = p
        if bar is not None:
            bar.update(len(samples))
            bar.set_postfix(mIoU=f"{100 * metric.compute().miou:.2f}")
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return EvalResult(metric.compute(), seconds, n / seconds, preds)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m groupvit.seg_datasets --dataset voc --root DIR --checkpoint CKPT|demo``: mIoU table.

    The official protocol (background by the dataset's score threshold); a checkpoint's own ``"segmentation"``
    settings (the training demo's prompts, mode and size) replace the defaults, options replace both."""
    import traceback

    ap = argparse.ArgumentParser(prog="python -m groupvit.seg_datasets", description=main.__doc__)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--root", required=True, help="dataset folder (see the module docstring for layouts)")
    ap.add_argument("--split", default=None, help="split name (default: val / val2017)")
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint file, HF model folder, hf:ORG/NAME (any spec load_checkpoint reads) or 'demo'",
    )
    ap.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle a checkpoint that holds objects "
        "beyond tensors and an official config (UNSAFE: a crafted file runs code)",
    )
    ap.add_argument("--preset", default=None, help="architecture preset; without --checkpoint: random weights")
    ap.add_argument("--mode", choices=("slide", "whole"), default=None, help="default: the checkpoint's, else slide")
    ap.add_argument(
        "--bg-thresh", type=float, default=None, help="default: the dataset's (VOC/COCO 0.95, Context 0.35)"
    )
    ap.add_argument("--short-side", type=int, default=None, help="default: the checkpoint's, else 448")
    ap.add_argument("--crop", type=int, default=None, help="default: the checkpoint's, else 448")
    ap.add_argument("--stride", type=int, default=None, help="default: the checkpoint's, else 224")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N >= 1 images only")
    ap.add_argument("--backend", choices=ops.BACKENDS, default=None)
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = ap.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise CliError(f"--limit {args.limit}: give a number of images >= 1 (or leave it out for all)")
        device = check_device(args.device)
        check_backend(args.backend, device)
        ds = build_dataset(args.dataset, args.root, args.split)
        model, settings = load_model(args.checkpoint, args.preset, args.trust_checkpoint)
        kw = {k: v for k, v in seg_settings(settings, model.cfg.vision.img_size).items() if k != "bg_thresh"}
        kw.update(
            {
                k: v
                for k, v in (
                    ("mode", args.mode),
                    ("short_side", args.short_side),
                    ("crop", args.crop),
                    ("stride", args.stride),
                    ("bg_thresh", args.bg_thresh),
                )
                if v is not None
            }
        )
        if args.bg_thresh is not None and not 0 <= args.bg_thresh <= 1:  # NaN fails too
            raise CliError(f"--bg-thresh {args.bg_thresh}: give a number in [0, 1] (a score; VOC 0.95)")
        cfg = ds.seg_config(batch_size=args.batch_size, **kw)
        model = model.to(device)
        if args.checkpoint is None:
            print(
                "warning: no --checkpoint: random weights, the mIoU is meaningless (useful for timing)", file=sys.stderr
            )
        if args.backend:
            ops.set_backend(args.backend)
        res = evaluate(model, ds, cfg, progress=not args.no_progress, limit=args.limit)  # a bad file: ValueError
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.debug:
            traceback.print_exc()
        print("error: " + "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()), file=sys.stderr)
        return 2
    print(res.metrics.table())
    print(res.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
