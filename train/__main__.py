"""Command line: ``python -m train`` (console script ``groupvit-train``).

Examples::

    python -m train --preset demo                                   # the embedded CPU default (training only)
    python -m train --config my.yaml data.batch_size=128 optim.epochs=10
    torchrun --nproc_per_node 8 -m train --preset gcc-yfcc backend=triton output_dir=runs/gcc-yfcc
    python -m train --preset gcc-yfcc --print-config                 # show the resolved config and exit
    python -m train --config my.yaml resume=auto                     # continue from output_dir/latest.pt

Overrides are ``dotted.key=value`` (values parsed as YAML: ``8``, ``1e-3``, ``true``, ``[1, 1, 1]``, ``null``);
``model.<field>=...`` overrides the GroupViT architecture (e.g. ``model.vision.depths=[2,1,1]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from train.config import PRESETS, load_config


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="groupvit-train",
        description="Pretrain GroupViT on webdataset shards.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="YAML or JSON file with a (partial) TrainConfig")
    ap.add_argument(
        "--preset", choices=sorted(PRESETS), help="start from a named preset (a --config file is applied on top)"
    )
    ap.add_argument("--resume", help="shortcut for resume=PATH|auto")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    try:
        cfg = load_config(args.config, preset=args.preset, overrides=overrides)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.backend == "triton":
        import torch

        from kernels.utils import triton_can_launch

        on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if not triton_can_launch("cuda" if on_cuda else "cpu"):
            ap.error(
                f"backend=triton needs a CUDA device (device={cfg.device} runs on the CPU here), or "
                f"TRITON_INTERPRET=1 in the environment (the Triton interpreter: correct but slow); "
                f"or set backend=eager"
            )
    if not cfg.data.train_shards and cfg.data.synthetic_train <= 0:
        ap.error("no training data: set data.train_shards (webdataset shard patterns) or data.synthetic_train")
    if cfg.data.train_shards:
        from train.data import expand_urls

        try:
            expand_urls(cfg.data.train_shards)  # a pattern matching no shard: one line, not a traceback later
        except (ValueError, FileNotFoundError) as e:
            ap.error(f"data.train_shards: {e}")
    from groupvit.checkpoint import CheckpointReadError
    from train.loop import train
    from train.rundir import FolderLockedError

    try:
        train(cfg)
    except (FileExistsError, FileNotFoundError, IsADirectoryError, FolderLockedError, CheckpointReadError) as e:
        ap.exit(2, f"groupvit-train: error: {e}\n")  # the output folder or resume checkpoint: one line, no traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
