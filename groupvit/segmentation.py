"""Zero-shot semantic segmentation with GroupViT: the official evaluation protocol (docs/groupvit.md §10.1-10.2).

Pipeline for one image::

    resize (short side 448, long side <= 2048) -> ImageNet normalisation
    -> sliding 448x448 windows, stride 224 (or the whole image)
       per window: pixel->group map from the soft assignment maps multiplied down the stages, bilinear upsample,
                   argmax group; group->class probabilities Pi'' (image-level top-k filter); foreground scores
                   P = O Pi''; background channel from a threshold
    -> window scores summed and divided by the per-pixel window count
    -> bilinear resize to the original size -> argmax over [background, classes...]

The pieces are plain functions (:func:`class_embeddings`, :func:`pixel_group_map`, :func:`group_class_probs`,
:func:`crop_scores`, :func:`slide_windows`, :func:`rescale_size`) so tests can check each against a direct
computation; :class:`ZeroShotSegmenter` ties them together and batches windows of equal size into one forward.
Every size is configurable (:class:`SegConfig`) so tiny models can run the same code on small images.
The model runs whatever backend :mod:`groupvit.ops` has selected (``eager`` or ``triton``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from groupvit.imageio import decode_image, to_rgb
from groupvit.tokenizer import tokenize as clip_tokenize
from kernels.reference import clamped_scale

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLike",
    "SegConfig",
    "ZeroShotSegmenter",
    "class_embeddings",
    "crop_scores",
    "group_class_probs",
    "load_image",
    "pixel_group_map",
    "rescale_size",
    "slide_windows",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, x255 units (docs/groupvit.md §10.2 step 1)
IMAGENET_STD = (58.395, 57.12, 57.375)
SIMPLE_TEMPLATES = ("a photo of a {}.",)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
Tokenize = Callable[..., Tensor]


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegConfig:
    """Protocol settings; defaults are the official VOC setting (docs/groupvit.md §10.2).

    Attributes:
        templates: prompt templates with one ``{}`` each; class embedding = normalise(mean of projected prompts).
        bg_thresh: background threshold (VOC / COCO 0.95, Context 0.35).
        topk: number of classes kept by the image-level filter (``min(topk, N_fg)``).
        crop, stride: sliding-window size and step in pixels (after resizing); ``stride <= crop``.
        short_side: resize target of the short side (``None`` keeps the input size).
        max_long_side: cap on the long side after resizing.
        mode: ``"slide"`` (windows) or ``"whole"`` (one forward on the whole resized image).
        background: add a background label 0 (classes become 1..N); without it labels are 0..N-1.
        batch_size: windows per forward pass (windows of one size are batched, also across images).
    """

    templates: tuple[str, ...] = SIMPLE_TEMPLATES
    bg_thresh: float = 0.95
    topk: int = 5
    crop: int = 448
    stride: int = 224
    short_side: int | None = 448
    max_long_side: int = 2048
    mode: str = "slide"
    background: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.templates, str):
            object.__setattr__(self, "templates", (self.templates,))
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"SegConfig.templates must be non-empty, each with exactly one '{{}}': {self.templates}")
        if self.mode not in ("slide", "whole"):
            raise ValueError(f"SegConfig.mode must be 'slide' or 'whole', got {self.mode!r}")
        b = self.bg_thresh
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 <= b <= 1.0:  # NaN fails the range test
            raise ValueError(f"SegConfig.bg_thresh must be a number in [0, 1] (a probability; VOC 0.95), got {b!r}")
        for name in ("topk", "crop", "stride", "max_long_side", "batch_size", "short_side"):
            v = getattr(self, name)
            if not (v is None and name == "short_side") and (
                isinstance(v, bool) or not isinstance(v, numbers.Integral)
            ):
                raise ValueError(f"SegConfig.{name} must be a whole number, got {v!r}")
        if self.topk < 1:
            raise ValueError(f"SegConfig.topk must be >= 1, got {self.topk}")
        if self.crop < 1 or not 1 <= self.stride <= self.crop:
            raise ValueError(
                f"SegConfig needs crop >= 1 and 1 <= stride <= crop (else pixels stay uncovered), "
                f"got crop={self.crop}, stride={self.stride}"
            )
        if self.short_side is not None and (self.short_side < 1 or self.max_long_side < 1):
            raise ValueError(
                f"SegConfig.short_side and max_long_side must be >= 1, got {self.short_side}, {self.max_long_side}"
            )
        if self.batch_size < 1:
            raise ValueError(f"SegConfig.batch_size must be >= 1, got {self.batch_size}")

    def replace(self, **changes) -> "SegConfig":
        return dataclasses.replace(self, **changes)


# ---- protocol pieces -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (BatchNorm in the projectors must use running statistics)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def class_embeddings(
    model: nn.Module,
    class_names: Sequence[str],
    templates: Sequence[str] = SIMPLE_TEMPLATES,
    *,
    tokenize: Tokenize | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Text embeddings ``[N, D]`` of the classes (docs/groupvit.md §10.1): every template filled with the class name is
    tokenized, encoded and **projected**; the projections are averaged over templates and only then L2-normalised
    (GroupViT's order; CLIP normalises first)."""
    names = list(class_names)
    if not names:
        raise ValueError("class_embeddings: the class list is empty")
    tokenize = tokenize or clip_tokenize  # the CLIP BPE tokenize(texts, context_length) -> LongTensor [N, L]
    prompts = [t.format(n) for n in names for t in templates]  # class-major: row i*T + j
    tokens = tokenize(prompts, context_length=model.cfg.text.context_length).to(_device(model))  # [N*T, L]
    with _eval_mode(model):
        emb = torch.cat([model.encode_text(tokens[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])
    emb = emb.float().reshape(len(names), len(templates), -1).mean(dim=1)  # [N, D]
    return F.normalize(emb, dim=-1)


def pixel_group_map(soft_maps: Sequence[Tensor], grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Final-group index per pixel ``[B, H, W]`` (docs/groupvit.md §10.2 step 3).

    ``soft_maps[i]`` is stage i's soft assignment ``[B, G_i, N_i]`` (``N_0 = h*w`` patches, ``N_i = G_{i-1}``).
    The maps are multiplied down the stages (``[N,G1] @ [G1,G2] ...``), reshaped to the patch grid ``(h, w)``,
    bilinearly upsampled (align_corners=False) to ``size`` and reduced to the argmax group (ties: lowest index).
    The one-hot ``O`` of the spec is this index map.
    """
    if not soft_maps:
        raise ValueError("pixel_group_map: the model reported no grouping maps (no grouping stage?)")
    h, w = grid
    m = soft_maps[0].transpose(1, 2).float()  # [B, N, G1]
    if m.shape[1] != h * w:
        raise ValueError(f"pixel_group_map: first map has {m.shape[1]} tokens, grid {h}x{w} needs {h * w}")
    for s in soft_maps[1:]:
        if s.shape[2] != m.shape[2]:
            raise ValueError(f"pixel_group_map: stage maps do not chain: {tuple(m.shape)} then {tuple(s.shape)}")
        m = m @ s.transpose(1, 2).float()  # [B, N, G_i]
    b, _, g = m.shape
    m = m.transpose(1, 2).reshape(b, g, h, w)  # [B, G, h, w]
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)  # [B, G, H, W]
    return m.max(dim=1).indices  # [B, H, W] (max().indices: first maximum, faster than argmax on CPU)


def group_class_probs(
    group_emb: Tensor, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, topk: int = 5
) -> Tensor:
    """Group-to-class probabilities ``Pi'' [B, G, N]`` (docs/groupvit.md §10.2 steps 4-6).

    Args:
        group_emb: projected group embeddings ``[B, G, D]`` (normalised here).
        image_emb: projected image embedding ``[B, D]`` (normalised here).
        text_emb: class embeddings ``[N, D]`` (normalised here).
        logit_scale: the *scale* ``s = min(exp(theta), 100)`` (not theta).
        topk: classes kept by the image-level filter, ``k = min(topk, N)``.

    ``Pi = softmax_c(s e_g.t_c)``; ``Pi'`` is the same softmax restricted to the k classes with the highest
    image-level ``softmax_c(s e.t_c)``; ``Pi'' = Pi' * Pi`` (zero outside the kept classes).
    """
    if (
        group_emb.dim() != 3
        or image_emb.dim() != 2
        or text_emb.dim() != 2
        or not group_emb.shape[0] == image_emb.shape[0]
        or not group_emb.shape[2] == image_emb.shape[1] == text_emb.shape[1]
    ):
        raise ValueError(
            f"group_class_probs: expected group [B,G,D], image [B,D], text [N,D]; got "
            f"{tuple(group_emb.shape)}, {tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        )
    t = F.normalize(text_emb.float(), dim=-1)  # [N, D]
    logits = logit_scale * F.normalize(group_emb.float(), dim=-1) @ t.t()  # [B, G, N]
    image_probs = torch.softmax(logit_scale * F.normalize(image_emb.float(), dim=-1) @ t.t(), dim=-1)  # [B, N]
    k = min(topk, t.shape[0])
    keep = torch.zeros_like(image_probs, dtype=torch.bool).scatter_(1, image_probs.topk(k, dim=-1).indices, True)
    kept = torch.softmax(logits.masked_fill(~keep[:, None, :], float("-inf")), dim=-1)  # Pi' [B, G, N]
    return kept * torch.softmax(logits, dim=-1)  # Pi''


def crop_scores(group_index: Tensor, probs: Tensor, bg_thresh: float | None) -> Tensor:
    """Per-pixel class scores ``[B, (1 +) N, H, W]`` (docs/groupvit.md §10.2 step 7).

    Args:
        group_index: ``[B, H, W]`` final group of each pixel (the one-hot ``O`` as indices).
        probs: ``Pi'' [B, G, N]``.
        bg_thresh: with a threshold, channel 0 is background: 1 where ``max_c P < min(bg_thresh, max Pi'')``,
            else 0 (``max Pi''`` over the whole window's groups and classes); ``None``: foreground only.

    ``P = O Pi''`` is computed as a gather (row ``group_index`` of ``Pi''``), which equals the one-hot product.
    """
    if group_index.dim() != 3 or probs.dim() != 3 or group_index.shape[0] != probs.shape[0]:
        raise ValueError(
            f"crop_scores: expected group_index [B,H,W] and probs [B,G,N]; got "
            f"{tuple(group_index.shape)}, {tuple(probs.shape)}"
        )
    b, hgt, wid = group_index.shape
    n = probs.shape[2]
    idx = group_index.reshape(b, 1, hgt * wid).expand(b, n, hgt * wid)
    fg = torch.gather(probs.transpose(1, 2), 2, idx).reshape(b, n, hgt, wid)  # [B, N, H, W]
    if bg_thresh is None:
        return fg
    thr = probs.amax(dim=(1, 2)).clamp(max=bg_thresh)  # [B]
    bg = (fg.amax(dim=1) < thr[:, None, None]).to(fg.dtype)  # [B, H, W]
    return torch.cat([bg[:, None], fg], dim=1)


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` of mmseg's slide inference: ``n = max(L - crop + stride - 1, 0) // stride + 1``
    per axis, window i starts at ``i * stride``; the last one is shifted back to end at the border; windows are
    ``min(crop, L)`` long (an image smaller than the crop is one window)."""
    if height < 1 or width < 1:
        raise ValueError(f"slide_windows: empty image {height}x{width}")

    def axis(length: int) -> list[tuple[int, int]]:
        n = max(length - crop + stride - 1, 0) // stride + 1
        out = []
        for i in range(n):
            end = min(i * stride + crop, length)
            out.append((max(end - crop, 0), end))
        return out

    return [(y1, y2, x1, x2) for y1, y2 in axis(height) for x1, x2 in axis(width)]


def rescale_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmcv ``imrescale`` size: one scale factor ``min(max_long / long, short / short_side_of_image)`` (up or down),
    sides rounded half up."""
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def load_image(src: ImageLike) -> np.ndarray:
    """An RGB ``uint8 [H, W, 3]`` array from a path, a PIL image or an array (``[H, W]`` grey or ``[H, W, 3|4]``).
    Unreadable files raise ``ValueError`` naming the file."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ValueError(f"cannot read image {str(path)!r}: no such file")
        try:
            return np.array(decode_image(path))  # 16-bit grey scaled to 8 bits, pixel cap (groupvit.imageio)
        except Exception as e:  # PIL raises UnidentifiedImageError / OSError / SyntaxError on bad files
            raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e
    if isinstance(src, Image.Image):
        return np.array(to_rgb(src))
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 RGB [H, W, 3], got {src.dtype}")
        if src.ndim == 2:
            return np.repeat(src[..., None], 3, axis=2)
        if src.ndim == 3 and src.shape[2] in (3, 4):
            return np.ascontiguousarray(src[..., :3])
        raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4], got {src.shape}")
    raise TypeError(f"expected an image path, PIL image or uint8 array, got {type(src).__name__}")


# ---- the segmenter ---------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """One image after resizing: normalised ``[3, H, W]``, its windows and their score accumulator."""

    image: Tensor
    orig_size: tuple[int, int]
    windows: list[tuple[int, int, int, int]]
    scores: Tensor | None = None  # [K, H, W]


class ZeroShotSegmenter:
    """Zero-shot segmentation of images into ``class_names`` (plus background) with a GroupViT.

    Labels: with ``cfg.background`` (default) 0 = background and class i of ``class_names`` = i + 1; otherwise
    class i = i. :attr:`labels` lists the names by label. The model is switched to eval mode.

    Args:
        model: a :class:`groupvit.GroupViT` (any object with ``encode_image_groups``, ``logit_scale``,
            ``cfg.vision.patch_size`` and, unless ``text_embeddings`` is given, ``encode_text``).
        class_names: foreground class names (no background).
        cfg: protocol settings.
        text_embeddings: precomputed class embeddings ``[N, D]`` (skips the text encoder).
        tokenize: tokenizer override (default: the CLIP BPE tokenizer).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        cfg: SegConfig | None = None,
        *,
        text_embeddings: Tensor | None = None,
        tokenize: Tokenize | None = None,
    ) -> None:
        if isinstance(class_names, str):
            raise TypeError("class_names must be a list of names, not one string")
        names = [str(n).strip() for n in class_names]
        if not names or any(not n for n in names):
            raise ValueError(f"class_names must be a non-empty list of non-empty names, got {list(class_names)}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"class names listed more than once: {dup}")
        self.cfg = cfg or SegConfig()
        if self.cfg.background and "background" in (n.lower() for n in names):
            raise ValueError(
                "'background' is added automatically (label 0); remove it from class_names or use "
                "SegConfig(background=False)"
            )
        self.model = model.eval()
        self.class_names = names
        self.device = _device(model)
        if text_embeddings is None:
            text_embeddings = class_embeddings(model, names, self.cfg.templates, tokenize=tokenize)
        if text_embeddings.dim() != 2 or text_embeddings.shape[0] != len(names):
            raise ValueError(f"text_embeddings must be [{len(names)}, D], got {tuple(text_embeddings.shape)}")
        self.text = F.normalize(text_embeddings.float(), dim=-1).to(self.device)  # [N, D]
        self.patch = int(model.cfg.vision.patch_size)
        p = next(model.parameters(), None)
        self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32  # model's compute dtype

    @property
    def labels(self) -> list[str]:
        """Name of each label value."""
        return (["background"] if self.cfg.background else []) + self.class_names

    # -- steps ---------------------------------------------------------------------------------------------------

    def prepare(self, image: ImageLike) -> _Prepared:
        """Resize (short side, long-side cap) and normalise; the windows of ``cfg.mode``."""
        rgb = torch.from_numpy(load_image(image)).to(self.device)  # [H0, W0, 3] uint8
        h0, w0 = rgb.shape[:2]
        x = rgb.permute(2, 0, 1)[None].float()  # [1, 3, H0, W0]
        if self.cfg.short_side is not None:
            size = rescale_size(h0, w0, self.cfg.short_side, self.cfg.max_long_side)
            if size != (h0, w0):  # bilinear on 0..255 values, rounded like an 8-bit resize
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = ((x - mean) / std)[0]  # [3, H, W]
        h, w = x.shape[1:]
        if self.cfg.mode == "slide":
            windows = slide_windows(h, w, self.cfg.crop, self.cfg.stride)
        else:
            windows = [(0, h, 0, w)]
        return _Prepared(x, (h0, w0), windows)

    @torch.inference_mode()
    def window_scores(self, crops: Tensor) -> Tensor:
        """Scores ``[B, K, h, w]`` of equally sized normalised crops ``[B, 3, h, w]`` (steps 3-7). Pixels beyond the
        last whole patch are covered by the upsampled map (the patch convolution ignores them)."""
        h, w = crops.shape[-2:]
        hp, wp = h // self.patch * self.patch, w // self.patch * self.patch
        if hp == 0 or wp == 0:
            raise ValueError(
                f"window {h}x{w} is smaller than one {self.patch}x{self.patch} patch; use a larger short_side/crop"
            )
        out = self.model.encode_image_groups(crops[:, :, :hp, :wp].to(self.dtype), return_maps=True)
        gidx = pixel_group_map([m.soft for m in out.maps], out.grid, (h, w))  # [B, h, w]
        scale = clamped_scale(self.model.logit_scale.detach().float())
        probs = group_class_probs(out.group_embeddings, out.embedding, self.text, scale, self.cfg.topk)  # fp32
        return crop_scores(gidx, probs, self.cfg.bg_thresh if self.cfg.background else None)

    def _run_windows(self, prepared: list[_Prepared]) -> None:
        """Accumulate window scores into each image's buffer; windows of one size share forwards."""
        jobs: dict[tuple[int, int], list[tuple[_Prepared, tuple[int, int, int, int]]]] = {}
        for p in prepared:
            k = len(self.labels)
            p.scores = torch.zeros(k, *p.image.shape[1:], device=self.device)
            for win in p.windows:
                jobs.setdefault((win[1] - win[0], win[3] - win[2]), []).append((p, win))
        bs = self.cfg.batch_size
        for items in jobs.values():
            for i in range(0, len(items), bs):
                chunk = items[i : i + bs]
                crops = torch.stack([p.image[:, y1:y2, x1:x2] for p, (y1, y2, x1, x2) in chunk])
                scores = self.window_scores(crops)  # [b, K, h, w]
                for (p, (y1, y2, x1, x2)), s in zip(chunk, scores):
                    p.scores[:, y1:y2, x1:x2] += s

    def _finish(self, p: _Prepared) -> Tensor:
        """Average overlapping windows, resize to the original size: scores ``[K, H0, W0]``."""
        count = torch.zeros(p.image.shape[1:], device=self.device)
        for y1, y2, x1, x2 in p.windows:
            count[y1:y2, x1:x2] += 1
        scores = p.scores / count
        if tuple(scores.shape[1:]) != p.orig_size:
            scores = F.interpolate(scores[None], size=p.orig_size, mode="bilinear", align_corners=False)[0]
        return scores

    # -- public --------------------------------------------------------------------------------------------------

    def predict_scores_batch(self, images: Sequence[ImageLike]) -> list[Tensor]:
        """Per-image class scores ``[K, H0, W0]`` at the original resolution (K = len(labels))."""
        prepared = [self.prepare(im) for im in images]
        with torch.inference_mode():
            self._run_windows(prepared)
            return [self._finish(p) for p in prepared]

    def predict_batch(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """Label maps ``int32 [H0, W0]`` (values index :attr:`labels`) for several images."""
        return [s.max(dim=0).indices.to(torch.int32).cpu().numpy() for s in self.predict_scores_batch(images)]

    def predict_scores(self, image: ImageLike) -> Tensor:
        return self.predict_scores_batch([image])[0]

    def predict(self, image: ImageLike) -> np.ndarray:
        """Label map ``int32 [H0, W0]`` of one image (values index :attr:`labels`)."""
        return self.predict_batch([image])[0]
