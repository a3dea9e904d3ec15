"""Image transforms for GroupViT training and evaluation, in PIL + torch (no torchvision: it has no CPU build here).

Train (docs/groupvit.md §9): RandomResizedCrop(224, scale 0.08–1, ratio 3/4–4/3, bilinear) → horizontal flip
p=0.5 →
RandAugment ``rand-m9-mstd0.5-inc1`` → to tensor → ImageNet normalise → RandomErasing(p=0.25, mode "pixel", 1 box).
Val: resize the short side to 256 (bilinear) → center crop 224 → to tensor → normalise.

Semantics follow torchvision (crop sampling, resize and center-crop rounding) and timm (RandAugment op set, level
mappings, per-op probability 0.5, magnitude noise; RandomErasing box sampling), re-implemented here. Differences
from the reference stack, all deliberate:

* every random draw comes from one caller-supplied :class:`random.Random` (the erasing noise from a
  ``torch.Generator`` seeded by it), so a sample's augmentation is reproducible from its own seed, independent of
  worker scheduling; timm draws the op choice from NumPy's global RNG instead, so streams are not bit-identical;
* RandAugment's geometric ops use bilinear resampling (timm picks bilinear or bicubic at random unless an
  interpolation is configured) and fill with the ImageNet mean colour (124, 116, 104), as timm's ``img_mean`` hparam.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from groupvit.imageio import DEFAULT_MAX_PIXELS, decode_array, image_size

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RandAugment",
    "TrainTransform",
    "ValTransform",
    "center_crop",
    "decode_region",
    "erasing_box",
    "normalize",
    "random_erasing",
    "random_resized_crop",
    "random_resized_crop_params",
    "resize_short_side",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)
_BILINEAR = Image.Resampling.BILINEAR


def _check_image(img: Image.Image, op: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"{op}: expected a PIL image, got {type(img).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _default_rng(rng: random.Random | None) -> random.Random:
    # Without an explicit rng, draw from Python's global RNG (which torch's DataLoader seeds per worker).
    return rng if rng is not None else random.Random(random.getrandbits(64))


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------
def random_resized_crop_params(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling → ``(top, left, h, w)``, always inside the image.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); if none fits, a center crop with
    the aspect ratio clamped into ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: random.Random,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """Crop a random region (see :func:`random_resized_crop_params`) and resize it to ``size × size`` (bilinear)."""
    top, left, h, w = random_resized_crop_params(img.width, img.height, scale, ratio, rng)
    # PIL's resize with a box crops and resizes in one antialiased pass.
    return img.resize((size, size), _BILINEAR, box=(left, top, left + w, top + h))


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the shorter side is ``size`` (long side ``int(size * long / short)``, as torchvision)."""
    w, h = img.size
    if w <= h:
        ow, oh = size, int(size * h / w)
    else:
        ow, oh = int(size * w / h), size
    return img if (ow, oh) == (w, h) else img.resize((ow, oh), _BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Center ``size × size`` crop (offsets rounded as torchvision); the image must be at least ``size`` each way."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}x{size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode_region(
    data: bytes,
    size: int,
    rng: random.Random,
    *,
    augment: bool = True,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The CPU half of a crop to ``size × size``: decode only as much as the crop needs, resize nothing.

    ``augment``: the crop is drawn as :func:`random_resized_crop` does (from the header's size, with ``rng``); else
    it is :func:`resize_short_side` + :func:`center_crop` (as ``TrainTransform(augment=False)``). A JPEG whose
    crop is at least ``2 size`` pixels each way is decoded DCT-scaled (:func:`groupvit.imageio.decode_array`) to
    the smallest size that keeps the crop at least ``size`` pixels each way.

    Returns:
        ``region``: ``uint8 [h, w, 3]``, a view of the decoded image: the crop plus the margin PIL's bilinear
        filter reads around it; ``box``: the crop as ``(x0, y0, x1, y1)`` in ``region``'s pixels (floats).
        Resizing ``box`` of ``region`` to ``size`` with PIL's filter (:meth:`train.gpu_augment.DeviceAugment.
        crop_resize`, batched on the device) gives the CPU path's crop of the decoded image.
    """
    w0, h0 = image_size(data, max_pixels)
    if augment:
        top, left, h, w = random_resized_crop_params(w0, h0, scale, ratio, rng)
    else:  # resize_short_side + center_crop as one box: the crop's columns of the whole resized image
        ow, oh = (size, int(size * h0 / w0)) if w0 <= h0 else (int(size * w0 / h0), size)
        cy, cx = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
        top, left, h, w = cy * h0 / oh, cx * w0 / ow, size * h0 / oh, size * w0 / ow
    reduce = min(w, h) >= 2 * size
    arr = decode_array(
        data, max_pixels, min_size=(math.ceil(w0 * size / w), math.ceil(h0 * size / h)) if reduce else None
    )
    fx, fy = arr.shape[1] / w0, arr.shape[0] / h0  # 1 unless the decode was DCT-scaled
    x0, x1, y0, y1 = left * fx, (left + w) * fx, top * fy, (top + h) * fy
    # PIL's bilinear support is max(1, box side / size) pixels around each output sample: keep that margin (+1)
    mx, my = math.ceil(max(1.0, (x1 - x0) / size)) + 1, math.ceil(max(1.0, (y1 - y0) / size)) + 1
    rx, ry = max(0, math.floor(x0) - mx), max(0, math.floor(y0) - my)
    region = arr[ry : min(arr.shape[0], math.ceil(y1) + my), rx : min(arr.shape[1], math.ceil(x1) + mx)]
    return region, (x0 - rx, y0 - ry, x1 - rx, y1 - ry)


# ---------------------------------------------------------------------------------------------------------------
# RandAugment (timm "rand-m9-mstd0.5-inc1": 2 ops drawn with replacement, each applied with p = 0.5 at a
# magnitude ~ N(9, 0.5²) clipped to [0, 10]; "inc1" = the "increasing" op set where a larger magnitude is always
# a stronger distortion)
# ---------------------------------------------------------------------------------------------------------------
def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: tuple[int, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=_BILINEAR, fillcolor=fill)


def _enhance(kind: Callable[[Image.Image], ImageEnhance._Enhance]):
    def op(img: Image.Image, m: float, rng: random.Random, fill: tuple[int, ...]) -> Image.Image:
        return kind(img).enhance(max(0.1, 1.0 + _signed(m / 10 * 0.9, rng)))

    return op


def _solarize_add(img: Image.Image, m: float, rng: random.Random, fill: tuple[int, ...]) -> Image.Image:
    add = int(m / 10 * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, m: float, rng: random.Random, fill: tuple[int, ...]) -> Image.Image:
    bits = 4 - int(m / 10 * 4)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


_OPS: dict[str, Callable[[Image.Image, float, random.Random, tuple[int, ...]], Image.Image]] = {
    "AutoContrast": lambda img, m, rng, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng, fill: ImageOps.equalize(img),
    "Invert": lambda img, m, rng, fill: ImageOps.invert(img),
    "Rotate": lambda img, m, rng, fill: img.rotate(_signed(m / 10 * 30, rng), resample=_BILINEAR, fillcolor=fill),
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": lambda img, m, rng, fill: ImageOps.solarize(img, 256 - int(m / 10 * 256)),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, m, rng, fill: _affine(img, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0), fill),
    "ShearY": lambda img, m, rng, fill: _affine(img, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0), fill),
    "TranslateXRel": lambda img, m, rng, fill: _affine(
        img, (1, 0, _signed(m / 10 * 0.45, rng) * img.width, 0, 1, 0), fill
    ),
    "TranslateYRel": lambda img, m, rng, fill: _affine(
        img, (1, 0, 0, 0, 1, _signed(m / 10 * 0.45, rng) * img.height), fill
    ),
}


class RandAugment:
    """timm-style RandAugment over the 15 "increasing" ops (AutoContrast … TranslateYRel).

    Args:
        num_ops: ops per image, drawn uniformly with replacement (timm ``n``, default 2).
        magnitude: mean magnitude on timm's 0–10 scale (``m``, default 9).
        magnitude_std: std of the per-op Gaussian magnitude noise (``mstd``, default 0.5); clipped to [0, 10].
        prob: probability each drawn op is applied (timm default 0.5).
        fill: RGB fill for pixels uncovered by geometric ops.
    """

    OPS = tuple(_OPS)

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        fill: tuple[int, int, int] = _FILL,
    ):
        if num_ops < 0 or not 0 <= magnitude <= 10 or magnitude_std < 0 or not 0 <= prob <= 1:
            raise ValueError(
                f"RandAugment: bad parameters num_ops={num_ops} magnitude={magnitude} "
                f"magnitude_std={magnitude_std} prob={prob}"
            )
        self.num_ops, self.magnitude, self.magnitude_std, self.prob, self.fill = (
            num_ops,
            magnitude,
            magnitude_std,
            prob,
            tuple(fill),
        )

    @classmethod
    def from_string(cls, spec: str) -> "RandAugment":
        """Parse a timm config string such as ``"rand-m9-mstd0.5-inc1"`` (keys m, n, mstd, p; only inc1)."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment.from_string: {spec!r} does not start with 'rand'")
        kw: dict[str, float] = {}
        for part in parts[1:]:
            key = part.rstrip("0123456789.")
            val = part[len(key) :]
            if key == "inc" and val == "1":
                continue
            names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "p": "prob"}
            if key not in names or not val:
                raise ValueError(
                    f"RandAugment.from_string: unsupported field {part!r} in {spec!r} (supported: m, n, mstd, p, inc1)"
                )
            kw[names[key]] = int(val) if key == "n" else float(val)
        if "inc1" not in parts[1:]:
            raise ValueError(f"RandAugment.from_string: only the increasing op set (inc1) is implemented: {spec!r}")
        return cls(**kw)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        rng = _default_rng(rng)
        img = _check_image(img, "RandAugment")
        for name in [rng.choice(self.OPS) for _ in range(self.num_ops)]:
            if rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = rng.gauss(m, self.magnitude_std)
            img = _OPS[name](img, max(0.0, min(10.0, m)), rng, self.fill)
        return img

    def __repr__(self) -> str:
        return (
            f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, p={self.prob}, "
            f"ops={len(self.OPS)})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Tensor ops
# ---------------------------------------------------------------------------------------------------------------
def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → ``FloatTensor [3, H, W]`` in [0, 1]."""
    arr = np.array(_check_image(img, "to_tensor"), dtype=np.uint8)  # [H, W, 3] (a writable copy)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(255.0)


def normalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place; ``x`` is ``[3, H, W]``."""
    if x.ndim != 3 or x.shape[0] != len(mean):
        raise ValueError(f"normalize: expected [{len(mean)}, H, W], got {list(x.shape)}")
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def _to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``normalize(to_tensor(img))`` computed in NumPy: per-image tensors are small, and torch's intra-op threads
    cost more than they save here (3-10x slower with 2 threads on a busy CPU)."""
    arr = np.asarray(img, dtype=np.float32)  # [H, W, 3]
    arr = (arr * np.float32(1 / 255) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [3, H, W]


def random_erasing(
    x: torch.Tensor,
    rng: random.Random,
    p: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """timm RandomErasing, mode "pixel", one box, on a normalised ``[C, H, W]`` tensor (in place).

    With probability ``p``: up to 10 tries of (area ~ U(min_area, max_area)·H·W, log aspect ~ U(±log min_aspect));
    the first box strictly smaller than the image is filled with per-pixel N(0, 1) noise.
    """
    if rng.random() >= p:
        return x
    c, h, w = x.shape
    box = erasing_box(h, w, rng, min_area, max_area, min_aspect)
    if box is not None:
        top, left, eh, ew = box
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        x[:, top : top + eh, left : left + ew] = torch.randn(c, eh, ew, generator=gen, dtype=x.dtype)
    return x


def erasing_box(
    h: int, w: int, rng: random.Random, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3
) -> tuple[int, int, int, int] | None:
    """timm RandomErasing's box ``(top, left, height, width)``: up to 10 tries of (area ~ U(min_area, max_area)·H·W,
    log aspect ~ U(±log min_aspect)), the first strictly smaller than the image; ``None`` if none fits."""
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    for _ in range(10):
        target = rng.uniform(min_area, max_area) * h * w
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            return rng.randint(0, h - eh), rng.randint(0, w - ew), eh, ew
    return None


# ---------------------------------------------------------------------------------------------------------------
# Composed transforms
# ---------------------------------------------------------------------------------------------------------------
class TrainTransform:
    """GroupViT's training transform: ``img (PIL) [, rng] -> FloatTensor [3, img_size, img_size]``.

    Args:
        img_size: output side (224 in the paper).
        augment: ``False`` gives a deterministic resize-short-side + center crop (for tiny synthetic data or
            debugging); ``True`` the full recipe below.
        scale, ratio: RandomResizedCrop area-fraction and aspect ranges.
        hflip: horizontal flip probability.
        rand_augment: timm config string, or ``None`` to disable.
        re_prob: RandomErasing probability (0 disables).
        mean, std: normalisation.

    ``rng`` (a :class:`random.Random`) drives every random choice, so ``t(img, random.Random(s))`` is reproducible.
    """

    def __init__(
        self,
        img_size: int = 224,
        augment: bool = True,
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"TrainTransform: img_size must be a positive int, got {img_size!r}")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"TrainTransform: bad scale {tuple(scale)} or ratio {tuple(ratio)}")
        self.img_size, self.augment = img_size, augment
        self.scale, self.ratio, self.hflip, self.re_prob = tuple(scale), tuple(ratio), hflip, re_prob
        self.rand_augment = RandAugment.from_string(rand_augment) if (augment and rand_augment) else None
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = _check_image(img, "TrainTransform")
        if not self.augment:
            return _to_normalized_tensor(
                center_crop(resize_short_side(img, self.img_size), self.img_size), self.mean, self.std
            )
        rng = _default_rng(rng)
        img = random_resized_crop(img, self.img_size, rng, self.scale, self.ratio)
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        x = _to_normalized_tensor(img, self.mean, self.std)  # [3, S, S]
        if self.re_prob > 0:
            x = random_erasing(x, rng, self.re_prob)
        return x

    def __repr__(self) -> str:
        return (
            f"TrainTransform(img_size={self.img_size}, augment={self.augment}, scale={self.scale}, "
            f"ratio={self.ratio}, hflip={self.hflip}, rand_augment={self.rand_augment}, re_prob={self.re_prob})"
        )


class ValTransform:
    """Evaluation transform: resize short side to ``resize_size`` → center crop ``img_size`` → normalise.

    Defaults (256 → 224) are the ImageNet protocol; ``resize_size`` defaults to ``round(img_size * 256 / 224)``.
    """

    def __init__(
        self,
        img_size: int = 224,
        resize_size: int | None = None,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        resize_size = round(img_size * 256 / 224) if resize_size is None else resize_size
        if img_size < 1 or resize_size < img_size:
            raise ValueError(f"ValTransform: need 1 <= img_size <= resize_size, got {img_size}, {resize_size}")
        self.img_size, self.resize_size, self.mean, self.std = img_size, resize_size, tuple(mean), tuple(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_short_side(_check_image(img, "ValTransform"), self.resize_size)
        return _to_normalized_tensor(center_crop(img, self.img_size), self.mean, self.std)  # [3, S, S]

    def __repr__(self) -> str:
        return f"ValTransform(img_size={self.img_size}, resize_size={self.resize_size})"
