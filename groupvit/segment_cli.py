"""``groupvit-segment``: zero-shot segmentation of your own images into the classes you name.

Example::

    groupvit-segment --checkpoint group_vit_gcc_yfcc_30e-879422e0.pth --classes cat,dog,sofa \\
        --out results/ photo1.jpg photo2.png

For each image ``<name>.<ext>`` it writes ``<out>/<name>_mask.png`` (palette PNG whose pixel values are label
indices: 0 = background, then the classes in the order given) and ``<out>/<name>_overlay.png`` (the image tinted by
class with a legend of the classes found), and prints the classes found with their share of the pixels.
``--checkpoint demo`` uses the model the training demo (``python -m train.demo``) writes, ``runs/demo/latest.pt``,
with the demo's settings unless given: short side = twice the model's training size, whole-image mode, background
threshold 0.9. Also runnable as
``python -m groupvit.segment_cli``. Exit status: 0 on success, 1 if some images failed (the others are still
written), 2 on a usage, checkpoint or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from groupvit.segmentation import SegConfig, ZeroShotSegmenter, load_image

__all__ = ["DEMO_CHECKPOINT", "load_model", "main", "overlay_with_legend", "palette", "parse_classes",
           "save_mask"]

DEMO_CHECKPOINT = Path("runs/demo/latest.pt")  # where the training demo (train/demo.py) writes its model
DEMO_BG_THRESH = 0.9  # the training demo's background threshold (train/demo.py uses these two)
DEMO_EVAL_SCALE = 2  # the demo segments at twice the training size, as the official protocol
_REPO = Path(__file__).resolve().parents[1]


class CliError(ValueError):
    """A problem with the arguments, checkpoint or configuration (exit status 2)."""


def demo_checkpoint_path() -> Path:
    """The demo model: ``runs/demo/latest.pt`` under the working directory, else under the repository."""
    for p in (DEMO_CHECKPOINT, _REPO / DEMO_CHECKPOINT):
        if p.is_file():
            return p
    raise CliError(f"demo model not found at {DEMO_CHECKPOINT} (or {_REPO / DEMO_CHECKPOINT}); "
                   f"train it first with the training demo (python -m train.demo), or pass --checkpoint FILE")


def load_model(checkpoint: str | None, preset: str | None = None, trust_checkpoint: bool = False):
    """A GroupViT in eval mode from a checkpoint (any spec :func:`groupvit.load_checkpoint` reads: file, HF model
    folder, ``hf:ORG/NAME``) or ``"demo"``; with ``preset`` the weights are loaded into that architecture (a mismatch
    is an error); with a preset and no checkpoint the weights are random. ``trust_checkpoint``: see
    :func:`groupvit.load_checkpoint` (it can run code from the file)."""
    from groupvit import create_model, load_checkpoint
    from groupvit.checkpoint import CheckpointReadError

    if checkpoint is None and preset is None:
        raise CliError("give --checkpoint FILE (or 'demo'), or --preset NAME for a randomly initialised model")
    try:
        model = create_model(preset) if preset is not None else None
    except ValueError as e:
        raise CliError(str(e)) from e
    if checkpoint is None:
        return model.eval()
    path = demo_checkpoint_path() if checkpoint == "demo" else checkpoint
    if not str(path).startswith("hf:") and not Path(path).exists():
        raise CliError(f"checkpoint {str(path)!r} does not exist")
    try:
        model = load_checkpoint(path, model, trust_checkpoint=trust_checkpoint)
    except CheckpointReadError as e:
        raise CliError(f"cannot load checkpoint {str(path)!r}: {e}") from e
    except ValueError as e:
        arch = f" and the --preset {preset!r} architecture" if preset else ""
        raise CliError(f"checkpoint {str(path)!r}{arch} do not match: {e}") from e
    except RuntimeError as e:
        raise CliError(f"cannot load checkpoint {str(path)!r}: {e}") from e
    return model.eval()


def parse_classes(text: str) -> list[str]:
    """``"cat, dog,sofa"`` -> ``["cat", "dog", "sofa"]``; empty, duplicate or 'background' entries are errors."""
    names = [n.strip() for n in text.split(",")]
    names = [n for n in names if n]
    if not names:
        raise CliError(f"--classes is empty ({text!r}): give at least one class name, e.g. --classes cat,dog")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CliError(f"--classes lists {dup} more than once")
    if any(n.lower() == "background" for n in names):
        raise CliError("'background' is added automatically as label 0; remove it from --classes "
                       "(or pass --no-background)")
    if len(names) > 255:
        raise CliError(f"{len(names)} classes: at most 255 fit a palette mask")
    return names


def palette(background: bool = True) -> np.ndarray:
    """Label colours ``uint8 [256, 3]``: the VOC colour map, label 0 black when it is the background (else the
    map shifted by one, so no class is drawn black)."""
    from groupvit.seg_datasets import voc_colormap

    return voc_colormap(257)[0 if background else 1:][:256]


def save_mask(labels: np.ndarray, path: Path, background: bool = True) -> None:
    """Palette PNG: pixel value = label index, colours from :func:`palette`."""
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"save_mask: labels must lie in 0..255, got {labels.min()}..{labels.max()}")
    im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    im.putpalette(palette(background).reshape(-1).tolist())
    im.save(path)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def overlay_with_legend(rgb: np.ndarray, labels: np.ndarray, names: Sequence[str], background: bool,
                        alpha: float = 0.55) -> Image.Image:
    """The image tinted by label colour (background left untinted) with a legend panel on the right listing the
    labels present, largest first, as colour box + name + pixel share."""
    colors = palette(background).astype(np.float32)
    tint = colors[labels]  # [H, W, 3]
    mix = rgb.astype(np.float32) * (1 - alpha) + tint * alpha
    if background:
        mix = np.where((labels == 0)[..., None], rgb.astype(np.float32), mix)
    img = Image.fromarray(mix.round().clip(0, 255).astype(np.uint8))
    present = np.bincount(labels.reshape(-1), minlength=len(names))
    order = [int(i) for i in np.argsort(-present, kind="stable") if present[i] > 0]
    h, w = labels.shape
    size = max(12, min(h, w) // 28)
    font = _font(size)
    probe = ImageDraw.Draw(img)
    entries = [f"{names[i]} ({100 * present[i] / labels.size:.1f}%)" for i in order]
    text_w = max(int(probe.textlength(e, font=font)) for e in entries)
    pad, box, row = size // 2, size, int(size * 1.6)
    panel_w = pad * 3 + box + text_w
    canvas = Image.new("RGB", (w + panel_w, max(h, pad * 2 + row * len(order))), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (i, entry) in enumerate(zip(order, entries)):
        y = pad + k * row
        c = tuple(int(v) for v in colors[i])
        draw.rectangle([w + pad, y, w + pad + box, y + box], fill=c, outline=(0, 0, 0))
        draw.text((w + 2 * pad + box, y), entry, fill=(0, 0, 0), font=font)
    return canvas


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="groupvit-segment", description=__doc__.split("\n\n")[0],
                                 epilog="Writes <out>/<name>_mask.png and <out>/<name>_overlay.png per image.")
    ap.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    ap.add_argument("--checkpoint", required=True, help="checkpoint file (official, HF or ours; .pth/.pt/.bin/"
                    ".safetensors), HuggingFace model folder, hf:ORG/NAME (needs huggingface_hub) or 'demo'")
    ap.add_argument("--trust-checkpoint", action="store_true", help="unpickle a checkpoint that holds objects "
                    "beyond tensors and an official config (UNSAFE: a crafted file runs code)")
    ap.add_argument("--classes", required=True, help="comma-separated class names, e.g. cat,dog,sofa")
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--preset", default=None, help="check the checkpoint against this architecture preset")
    ap.add_argument("--bg-thresh", type=float, default=None, help="background threshold (default 0.95; demo 0.9)")
    ap.add_argument("--no-background", action="store_true", help="no background label: every pixel gets a class")
    ap.add_argument("--mode", choices=("slide", "whole"), default=None, help="default slide (demo: whole)")
    ap.add_argument("--short-side", type=int, default=None,
                    help="resize target (default 448; demo: 2x the training size)")
    ap.add_argument("--crop", type=int, default=448, help="sliding-window size (default 448)")
    ap.add_argument("--stride", type=int, default=224, help="sliding-window step (default 224)")
    ap.add_argument("--template", action="append", default=None,
                    help="prompt template with {} (repeatable; default 'a photo of a {}.')")
    ap.add_argument("--backend", choices=("eager", "triton"), default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def check_backend(backend: str | None, device: str) -> None:
    """The triton backend needs CUDA, or the (slow) Triton interpreter on CPU."""
    if backend == "triton" and not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise CliError(f"--backend triton on {device} needs a CUDA device, or TRITON_INTERPRET=1 in the environment "
                       f"(the Triton interpreter: correct but slow); or use --backend eager")


def _pick(value, default):
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from groupvit import ops

    try:
        names = parse_classes(args.classes)
        check_backend(args.backend, args.device)
        model = load_model(args.checkpoint, args.preset, args.trust_checkpoint).to(args.device)
        demo = args.checkpoint == "demo"
        demo_side = DEMO_EVAL_SCALE * model.cfg.vision.img_size
        cfg = SegConfig(bg_thresh=_pick(args.bg_thresh, DEMO_BG_THRESH if demo else 0.95),
                        mode=_pick(args.mode, "whole" if demo else "slide"),
                        short_side=_pick(args.short_side, demo_side if demo else 448),
                        crop=args.crop, stride=args.stride, background=not args.no_background,
                        **({"templates": tuple(args.template)} if args.template else {}))
        if args.backend:
            ops.set_backend(args.backend)
        seg = ZeroShotSegmenter(model, names, cfg)
    except (CliError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    used: set[str] = set()
    for src in args.images:
        try:
            rgb = load_image(src)
        except (ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(src)
            continue
        labels = seg.predict(rgb)
        stem, k = Path(src).stem, 2
        name = stem
        while name in used:  # two inputs with the same file name: keep both outputs
            name, k = f"{stem}-{k}", k + 1
        used.add(name)
        save_mask(labels, out / f"{name}_mask.png", cfg.background)
        overlay_with_legend(rgb, labels, seg.labels, cfg.background).save(out / f"{name}_overlay.png")
        counts = np.bincount(labels.reshape(-1), minlength=len(seg.labels))
        found = ", ".join(f"{seg.labels[i]} ({100 * counts[i] / labels.size:.1f}%)"
                          for i in np.argsort(-counts, kind="stable") if counts[i] > 0)
        print(f"{src}: {found}  -> {out / (name + '_mask.png')}, {out / (name + '_overlay.png')}")
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} images failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
