"""``groupvit-segment``: zero-shot segmentation of your own images into the classes you name.

Example::

    groupvit-segment --checkpoint group_vit_gcc_yfcc_30e-879422e0.pth --classes cat,dog,sofa \\
        --out results/ photo1.jpg photo2.png

For each image ``<name>.<ext>`` it writes ``<out>/<name>_mask.png`` (palette PNG whose pixel values are label
indices: 0 = background, then the classes in the order given) and ``<out>/<name>_overlay.png`` (the image tinted by
class with a legend of the classes found; colours from :mod:`groupvit.drawing`), and prints the classes found with
their share of the pixels.

Settings come from the command line, else from the checkpoint's own ``"segmentation"`` entry (the training demo
stores its classes, prompts, threshold and evaluation size there), else the official VOC protocol (slide 448/224,
"a photo of a {}.", threshold 0.95). ``--checkpoint demo`` is ``runs/demo/latest.pt``, where ``python -m train.demo``
writes its model. Background (``--background``):

* ``threshold`` (the official protocol, used for dataset mIoU): a pixel is background where its best class score,
  a softmax over the classes given, is below ``--bg-thresh``. Reliable with about four or more classes; with one to
  three the softmax is confident everywhere and the background is painted as a class;
* ``others``: the same threshold, with the softmax also run over other classes (the checkpoint's own class list,
  e.g. the demo's six colours, else the 59 PASCAL Context classes); pixels won by one of those are background
  too. For a few classes of your own; on the demo model ``--classes red,green,blue`` gives mIoU 66.5 this way
  against 18.2 by ``threshold`` and 13.9 by ``prompt`` (background + 3 colours on 40 held-out demo images; 2-core
  CPU machine, a 532-step demo model, commit 8668618);
* ``prompt``: the background is one more text class (``--bg-name``, default the checkpoint's, e.g. the demo's
  "grey background", else "background"); as good as the text tower knows the background (poor on the demo);
* ``none``: every pixel gets a class.

Default: ``others`` for fewer than four classes, else ``threshold``. Also runnable as
``python -m groupvit.segment_cli``. Exit status: 0 on success, 1 if some images failed (each is reported, the
others are still written), 2 on a usage, checkpoint or configuration error (one line; ``--debug`` for a traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from groupvit import drawing, ops
from groupvit.cli import CliError, check_backend, check_device, load_model, seg_settings
from groupvit.seg_datasets import CONTEXT_CLASSES
from groupvit.segmentation import SegConfig, ZeroShotSegmenter, class_embeddings, load_image

__all__ = ["BACKGROUNDS", "Segmenter", "main", "parse_classes"]

BACKGROUNDS = ("threshold", "others", "prompt", "none")
FEW_CLASSES = 4  # below this many classes the default background is "others" (the threshold cannot act)


def parse_classes(text: str) -> list[str]:
    """``"cat, dog,sofa"`` -> ``["cat", "dog", "sofa"]``; without commas the text is split on spaces
    (``"red green blue"``; end one multi-word class with a comma: ``"traffic light,"``). Empty, duplicate or
    'background' entries are errors."""
    names = [n.strip() for n in (text.split(",") if "," in text else text.split())]
    names = [re.sub(r"\s+", " ", n) for n in names if n]
    if not names:
        raise CliError(f"--classes is empty ({text!r}): give at least one class name, e.g. --classes cat,dog")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CliError(f"--classes lists {dup} more than once: name each class once")
    if any(n.lower() == "background" for n in names):
        raise CliError(
            "'background' is added automatically as label 0; remove it from --classes (or pass --background none)"
        )
    if len(names) > 255:
        raise CliError(f"{len(names)} classes: at most 255 fit a palette mask; give fewer --classes")
    return names


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="groupvit-segment",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("For each image") :].replace("``", ""),
    )
    ap.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file (official, HF or ours; .pth/.pt/.bin/"
        ".safetensors), HuggingFace model folder, hf:ORG/NAME (needs huggingface_hub) or 'demo'",
    )
    ap.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle a checkpoint that holds objects "
        "beyond tensors and an official config (UNSAFE: a crafted file runs code)",
    )
    ap.add_argument(
        "--classes",
        default=None,
        help="class names, comma-separated (cat,dog,sofa) or, without "
        "commas, space-separated ('red green blue'); default: the checkpoint's classes (the demo's)",
    )
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--preset", default=None, help="check the checkpoint against this architecture preset")
    ap.add_argument(
        "--background",
        choices=BACKGROUNDS,
        default=None,
        help=f"how background is found (see below); default: others with fewer than {FEW_CLASSES} "
        f"classes, else threshold",
    )
    ap.add_argument(
        "--bg-thresh",
        type=float,
        default=None,
        help="--background threshold: score below which a pixel is background, in [0, 1] "
        "(default: the checkpoint's, else 0.95)",
    )
    ap.add_argument(
        "--bg-name",
        default=None,
        help="--background prompt: the background's name (default: the "
        "checkpoint's, e.g. the demo's 'grey background', else 'background')",
    )
    ap.add_argument(
        "--no-background",
        dest="background",
        action="store_const",
        const="none",
        help="same as --background none: every pixel gets a class",
    )
    ap.add_argument(
        "--mode",
        choices=("slide", "whole"),
        default=None,
        help="sliding windows or the whole image (default: the checkpoint's, else slide)",
    )
    ap.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="resize target (default: the checkpoint's, e.g. the demo's 2x training size, else 448)",
    )
    ap.add_argument("--crop", type=int, default=None, help="sliding-window size (default: as --short-side, 448)")
    ap.add_argument("--stride", type=int, default=None, help="sliding-window step (default 224, or the crop)")
    ap.add_argument(
        "--template",
        action="append",
        default=None,
        help="prompt template with {} (repeatable; default: the checkpoint's, else 'a photo of a {}.')",
    )
    ap.add_argument("--backend", choices=("eager", "triton"), default=None)
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    return ap


def check_out_dir(out: str | os.PathLike) -> Path:
    """The output folder, created if missing; an existing file there is an error."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {str(path)!r} is a file, not a folder: give a folder name (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--out {str(path)!r}: cannot create the folder ({e.strerror}); give a writable folder") from e
    return path


def _config(
    args: argparse.Namespace, settings: Mapping[str, Any], img_size: int, n_classes: int
) -> tuple[SegConfig, str]:
    """The SegConfig and background mode: command line, else the checkpoint's settings, else the defaults."""
    kw = seg_settings(settings, img_size)
    background = args.background or ("others" if n_classes < FEW_CLASSES else "threshold")
    if args.bg_thresh is not None:
        if not math.isfinite(args.bg_thresh) or not 0 <= args.bg_thresh <= 1:
            raise CliError(f"--bg-thresh {args.bg_thresh}: give a number in [0, 1] (a score; official 0.95)")
        kw["bg_thresh"] = args.bg_thresh
    for key in ("mode", "short_side", "crop", "stride"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.crop is not None and args.stride is None:
        kw["stride"] = min(kw.get("stride", 224), args.crop)
    if args.template:
        kw["templates"] = tuple(args.template)
    kw["background"] = background in ("threshold", "others")
    try:
        return SegConfig(**kw), background
    except ValueError as e:
        raise CliError(f"{e}; fix the option (see --help)") from e


class Segmenter:
    """The CLI's segmenter: :class:`ZeroShotSegmenter` plus the background mode. :attr:`labels` names the output
    labels (label 0 = "background" unless the mode is ``none``).

    ``prompt``: the background is one more text class (its name prompted with the checkpoint's background templates,
    else the class templates) in front of the classes. ``others``: the classes are followed by the other classes
    (the checkpoint's ``classes``, else PASCAL Context's), whose pixels are mapped to the background."""

    def __init__(
        self,
        model: Any,
        names: list[str],
        cfg: SegConfig,
        background: str,
        bg_name: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        settings = settings or {}
        self.labels = (["background"] if background != "none" else []) + names
        self.others: list[str] = []
        text = None
        if background == "prompt":
            name = bg_name or settings.get("background_name") or "background"
            templates = tuple(settings.get("background_templates") or cfg.templates)
            text = torch.cat(
                [class_embeddings(model, [name], templates), class_embeddings(model, names, cfg.templates)]
            )
            names = ["background", *names]
        elif background == "others":
            given = {n.lower() for n in names}
            vocab = settings.get("classes") or CONTEXT_CLASSES[1:]
            self.others = [v for v in dict.fromkeys(str(v) for v in vocab) if v.lower() not in given]
            names = [*names, *self.others]
        self.seg = ZeroShotSegmenter(model, names, cfg, text_embeddings=text)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """Label map ``int32 [H, W]`` indexing :attr:`labels`."""
        labels = self.seg.predict(rgb)
        if self.others:
            labels = np.where(labels >= len(self.labels), 0, labels).astype(np.int32)
        return labels


def _segment_one(seg: Segmenter, src: str, out: Path, name: str, background: bool, colors: np.ndarray) -> str:
    """Segment ``src``, write its mask and overlay, return the summary line."""
    rgb = load_image(src)
    labels = seg.predict(rgb)
    mask, overlay = out / f"{name}_mask.png", out / f"{name}_overlay.png"
    drawing.mask_image(labels, colors).save(mask)
    drawing.overlay_with_legend(rgb, labels, seg.labels, colors, background).save(overlay)
    counts = np.bincount(labels.reshape(-1), minlength=len(seg.labels))
    found = ", ".join(
        f"{seg.labels[i]} ({100 * counts[i] / labels.size:.1f}%)"
        for i in np.argsort(-counts, kind="stable")
        if counts[i] > 0
    )
    return f"{src}: {found}  -> {mask}, {overlay}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        device = check_device(args.device)
        check_backend(args.backend, device)
        given = parse_classes(args.classes) if args.classes is not None else None
        model, settings = load_model(args.checkpoint, args.preset, args.trust_checkpoint)
        names = given or list(settings.get("classes") or [])
        if not names:
            raise CliError("give --classes (e.g. --classes cat,dog,sofa); this checkpoint names no classes of its own")
        if given is None:
            print(f"classes from the checkpoint: {', '.join(names)}", file=sys.stderr)
        cfg, background = _config(args, settings, model.cfg.vision.img_size, len(names))
        out = check_out_dir(args.out)
        model = model.to(device)
        if args.backend:
            ops.set_backend(args.backend)
        seg = Segmenter(model, names, cfg, background, args.bg_name, settings)
    except (CliError, ValueError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    has_bg = background != "none"
    colors = drawing.label_colors(seg.labels, has_bg)
    failed: list[str] = []
    used: set[str] = set()
    for src in args.images:
        stem, k = Path(src).stem, 2
        name = stem
        while name in used:  # two inputs with the same file name: keep both outputs
            name, k = f"{stem}-{k}", k + 1
        used.add(name)
        try:
            print(_segment_one(seg, src, out, name, has_bg, colors))
        except Exception as e:  # one bad image is reported and skipped; the others are still segmented
            if args.debug:
                traceback.print_exc()
            print(f"error: {e}" if str(src) in str(e) else f"error: {src}: {e}", file=sys.stderr)
            failed.append(src)
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} images failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
