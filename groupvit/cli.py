"""The plumbing shared by the segmentation commands (``groupvit-segment``, ``python -m groupvit.seg_datasets``):
model loading (a checkpoint, ``demo`` or a preset) with the checkpoint's own segmentation settings, device and
backend checks, and :class:`CliError`, the one kind of user error (a one-line message, exit status 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from groupvit.checkpoint import load_checkpoint, read_checkpoint
from groupvit.model import create_model
from kernels.utils import triton_can_launch

__all__ = [
    "CliError",
    "DEMO_CHECKPOINT",
    "check_backend",
    "check_device",
    "demo_checkpoint_path",
    "load_model",
    "seg_settings",
]

DEMO_CHECKPOINT = Path("runs/demo/latest.pt")  # `--checkpoint demo`: the training demo's default output
_REPO = Path(__file__).resolve().parents[1]


class CliError(ValueError):
    """A problem with the arguments, checkpoint or configuration (exit status 2)."""


def demo_checkpoint_path() -> Path:
    """The demo model: ``runs/demo/latest.pt`` under the working directory, else under the repository."""
    for p in (DEMO_CHECKPOINT, _REPO / DEMO_CHECKPOINT):
        if p.is_file():
            return p
    raise CliError(
        f"demo model not found at {DEMO_CHECKPOINT} (or {_REPO / DEMO_CHECKPOINT}); "
        f"train it first with the training demo (python -m train.demo), or pass --checkpoint FILE"
    )


def load_model(
    checkpoint: str | None, preset: str | None = None, trust_checkpoint: bool = False
) -> tuple[Any, dict[str, Any]]:
    """``(model, settings)``: a GroupViT in eval mode from a checkpoint (any spec :func:`groupvit.load_checkpoint`
    reads: file, HF model folder, ``hf:ORG/NAME``) or ``"demo"``, and the checkpoint's ``"segmentation"`` entry
    (``{}`` if none). With ``preset`` the weights are loaded into that architecture (a mismatch is an error); with a
    preset and no checkpoint the weights are random. ``trust_checkpoint``: see :func:`groupvit.load_checkpoint`
    (it can run code from the file)."""
    if checkpoint is None and preset is None:
        raise CliError("give --checkpoint FILE (or 'demo'), or --preset NAME for a randomly initialised model")
    try:
        model = create_model(preset) if preset is not None else None
    except ValueError as e:
        raise CliError(str(e)) from e
    if checkpoint is None:
        return model.eval(), {}
    path = demo_checkpoint_path() if checkpoint == "demo" else checkpoint
    if not str(path).startswith("hf:") and not Path(path).exists():
        raise CliError(
            f"checkpoint {str(path)!r} does not exist: give a checkpoint file, a HuggingFace model "
            f"folder, hf:ORG/NAME or 'demo'"
        )
    try:
        payload = read_checkpoint(path, trust_checkpoint)
        model = load_checkpoint(payload, model)
    except ValueError as e:
        arch = f" and the --preset {preset!r} architecture" if preset else ""
        if "does not match" in str(e) or "mismatch" in str(e):
            raise CliError(f"checkpoint {str(path)!r}{arch} do not match: {e}") from e
        raise CliError(f"cannot load checkpoint {str(path)!r}: {e}") from e
    except (OSError, RuntimeError, TypeError, KeyError, AttributeError) as e:
        raise CliError(
            f"cannot load checkpoint {str(path)!r} ({type(e).__name__}: {e}): is it a GroupViT "
            f"checkpoint? (--preset NAME gives the architecture of a bare state dict)"
        ) from e
    settings = payload.get("segmentation")
    return model.eval(), dict(settings) if isinstance(settings, Mapping) else {}


def seg_settings(settings: Mapping[str, Any], img_size: int) -> dict[str, Any]:
    """:class:`SegConfig` keyword arguments from a checkpoint's ``"segmentation"`` entry (the training demo's:
    ``templates``, ``bg_thresh``, ``topk``, ``mode``, ``eval_scale`` x the training size as the resize target and
    window); unknown or absent keys keep SegConfig's defaults (the official VOC protocol)."""
    kw: dict[str, Any] = {}
    if settings.get("templates"):
        kw["templates"] = tuple(settings["templates"])
    for key in ("bg_thresh", "topk", "mode"):
        if key in settings:
            kw[key] = settings[key]
    if "eval_scale" in settings:
        side = int(round(float(settings["eval_scale"]) * img_size))
        kw.update(short_side=side, crop=side, stride=side)
    return kw


def check_backend(backend: str | None, device: str) -> None:
    """The triton backend needs CUDA, or the (slow) Triton interpreter on CPU."""
    if backend == "triton" and not triton_can_launch(device):
        raise CliError(
            f"--backend triton on {device} needs a CUDA device, or TRITON_INTERPRET=1 in the environment "
            f"(the Triton interpreter: correct but slow); or use --backend eager"
        )


def check_device(device: str | None) -> str:
    """``device`` (default: cuda if available, else cpu), checked: a CUDA device must exist."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CliError(f"--device {device!r} is not a device name ({e}): use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(
                f"--device {device}: this torch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..")
    elif dev.type != "cpu":
        raise CliError(f"--device {device}: only cpu and cuda are supported")
    return device
