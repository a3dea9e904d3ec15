"""The embedded default: train a small GroupViT on generated coloured shapes, then segment held-out images zero-shot.

    python -m train.demo                       # (make demo) ~8 minutes on 2 CPU cores
    python -m train.demo --steps 100 --out runs/demo-quick

1. writes the synthetic dataset (:mod:`train.synthetic`: 1-3 coloured shapes on textured grey, captions such as
   "a red circle and a blue square") to webdataset shards under ``<out>/data`` on first use;
2. trains the ``demo`` preset (:data:`train.config.PRESETS`) with the regular driver (:func:`train.loop.train`):
   the same shards -> loader -> train_step -> checkpoint path as a real run;
3. zero-shot segmentation of the held-out images with :class:`groupvit.segmentation.ZeroShotSegmenter`
   (soft maps multiplied down the stages -> argmax group per pixel -> group embeddings vs the class prompts
   "a photo of a {colour}." -> background by threshold), for the trained model and for its untrained
   initialisation (same seed), mIoU over background + 6 colours;
4. writes overlay pictures (image | ground truth | untrained | trained) to ``<out>/overlays``.

No class label is ever seen in training: grouping and naming emerge from the captions alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# Project layout: the NLTK tagger for the multi-label prompts sits in ../shared/data beside a CI checkout.
_SHARED_NLTK = Path(__file__).resolve().parents[2] / "shared" / "data" / "nltk_data"
if "NLTK_DATA" not in os.environ and _SHARED_NLTK.is_dir():
    os.environ["NLTK_DATA"] = str(_SHARED_NLTK)

import groupvit  # noqa: E402
from groupvit.segmentation import SegConfig, ZeroShotSegmenter  # noqa: E402
from train.config import TrainConfig, apply_override, load_config  # noqa: E402

KIND = "color"  # evaluation vocabulary of train.synthetic: background + 6 colours


def _tagger_available() -> bool:
    try:
        from train.prompts import load_tagger

        load_tagger()
        return True
    except LookupError:
        return False


def seg_config(cfg: TrainConfig, bg_thresh: float) -> SegConfig:
    s = cfg.data.img_size
    return SegConfig(templates=("a photo of a {}.",), bg_thresh=bg_thresh, topk=5, crop=s, stride=s, short_side=None,
                     mode="whole", batch_size=64)


def evaluate(model: groupvit.GroupViT, val: list, cfg: TrainConfig, bg_thresh: float
             ) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """mIoU (background + colours) of zero-shot predictions on ``val = [(image, caption, mask)]``."""
    from groupvit.seg_datasets import MeanIoU
    from train.synthetic import class_names

    names = class_names(KIND)
    seg = ZeroShotSegmenter(model, names[1:], seg_config(cfg, bg_thresh))
    preds = seg.predict_batch([img for img, _, _ in val])
    metric = MeanIoU(len(names), class_names=names)
    for p, (_, _, mask) in zip(preds, val):
        metric.update(p, mask)
    res = metric.compute()
    return res.miou, res.iou, preds


def _palette(n: int) -> np.ndarray:
    from train.synthetic import COLORS

    pal = np.zeros((max(n, 7), 3), np.uint8)
    pal[0] = (0, 0, 0)
    for i, rgb in enumerate(COLORS.values()):
        pal[i + 1] = rgb
    return pal


def write_overlays(val: list, preds_untrained: list[np.ndarray], preds_trained: list[np.ndarray], out: Path,
                   n: int = 12) -> list[Path]:
    """One PNG per image: input | ground truth | untrained | trained (labels blended over the image)."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    pal = _palette(7)
    paths = []
    for i, ((img, cap, mask), pu, pt) in enumerate(zip(val[:n], preds_untrained, preds_trained)):
        base = np.asarray(img, np.float32)
        tiles = [base.astype(np.uint8)]
        for lab in (mask, pu, pt):
            colour = pal[np.asarray(lab, np.int64)].astype(np.float32)
            fg = (np.asarray(lab) > 0)[..., None]
            tiles.append(np.where(fg, 0.35 * base + 0.65 * colour, 0.35 * base).astype(np.uint8))
        s = 3  # upscale for viewing
        h, w = base.shape[:2]
        canvas = Image.new("RGB", (4 * w * s + 3 * 4, h * s + 14), (255, 255, 255))
        for k, t in enumerate(tiles):
            canvas.paste(Image.fromarray(t).resize((w * s, h * s), Image.Resampling.NEAREST), (k * (w * s + 4), 14))
        ImageDraw.Draw(canvas).text((2, 1), f"{cap}  |  truth  |  untrained  |  trained", fill=(0, 0, 0))
        p = out / f"overlay_{i:02d}.png"
        canvas.save(p)
        paths.append(p)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output directory (default: the demo preset's runs/demo)")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the full schedule)")
    ap.add_argument("--bg-thresh", type=float, default=None, help="background threshold of the segmentation")
    ap.add_argument("--val", type=int, default=None, help="held-out images to evaluate (default: preset)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("overrides", nargs="*", help="TrainConfig overrides key=value (see train/config.py)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(preset="demo", overrides=args.overrides)
    if args.out:
        cfg = apply_override(cfg, "output_dir", args.out)
    if args.steps is not None:
        cfg = apply_override(cfg, "max_steps", args.steps)
    if args.val is not None:
        cfg = apply_override(cfg, "data.synthetic_val", args.val)
    if cfg.data.multi_label > 0 and not _tagger_available():
        print("note: NLTK's POS tagger is not installed (set NLTK_DATA); training without the multi-label loss",
              file=sys.stderr)
        cfg = apply_override(cfg, "data.multi_label", 0)
    bg = args.bg_thresh if args.bg_thresh is not None else DEMO_BG_THRESH
    out = Path(cfg.output_dir)

    from train.loop import prepare_synthetic, seed_everything, train
    from train.synthetic import load_val

    print(f"[demo] data: {cfg.data.synthetic_train} train + {cfg.data.synthetic_val} held-out images "
          f"({cfg.data.img_size}x{cfg.data.img_size}) in {cfg.data.synthetic_dir or out / 'data'}", file=sys.stderr)
    cfg = prepare_synthetic(cfg)
    root = Path(cfg.data.synthetic_dir or out / "data")
    val = load_val(root, KIND)[: cfg.data.synthetic_val]
    t_data = time.perf_counter() - t0

    # the untrained initialisation: the same seed the trainer uses
    seed_everything(cfg.seed)
    untrained = groupvit.create_model(cfg.model.preset, **cfg.model_overrides())
    miou0, iou0, preds0 = evaluate(untrained, val, cfg, bg)

    summary = train(dataclasses.replace(cfg, resume=cfg.resume or None))
    model = groupvit.load_checkpoint(out / "latest.pt")
    miou1, iou1, preds1 = evaluate(model, val, cfg, bg)
    overlays = write_overlays(val, preds0, preds1, out / "overlays")

    from train.synthetic import class_names

    names = class_names(KIND)
    rows = "\n".join(f"  {n:<11} {100 * a:6.1f} {100 * b:6.1f}" for n, a, b in zip(names, iou0, iou1))
    wall = time.perf_counter() - t0
    result = {"miou_untrained": miou0, "miou_trained": miou1, "iou_untrained": iou0.tolist(),
              "iou_trained": iou1.tolist(), "classes": names, "val_images": len(val), "bg_thresh": bg,
              "steps": summary["steps"], "train_s": summary["train_s"], "data_s": t_data, "wall_s": wall,
              "final_loss": summary["final_loss"], "multi_label": cfg.data.multi_label}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"\nzero-shot segmentation of {len(val)} held-out images (IoU %, background + colours):\n"
          f"  {'class':<11} {'untrained':>6} {'trained':>6}\n{rows}\n"
          f"  {'mIoU':<11} {100 * miou0:6.1f} {100 * miou1:6.1f}\n"
          f"overlays: {overlays[0].parent}/overlay_*.png   total time {wall:.0f} s "
          f"(data {t_data:.0f} s, training {summary['train_s']:.0f} s)")
    return 0


DEMO_BG_THRESH = 0.5


if __name__ == "__main__":
    raise SystemExit(main())
