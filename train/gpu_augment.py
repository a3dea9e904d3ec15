"""Batched training augmentation on the device (``data.augment_on = gpu``).

The CPU half runs in the loader workers, per sample: :func:`train.transforms.decode_region` decodes only what the
RandomResizedCrop needs (libjpeg-turbo through simplejpeg, DCT-scaled where the crop allows it) and keeps the crop's
region un-resized; :meth:`DeviceAugment.sample_params` draws every remaining random choice from the sample's own
:class:`random.Random` into one row of numbers. Workers ship the regions as one flat ``uint8`` buffer with a
``[B, 6]`` geometry row each (:meth:`DeviceAugment.pack_regions`) plus the ``[B, P]`` parameter rows;
on the device :meth:`DeviceAugment.crop_resize` resizes every crop to ``S × S`` with PIL's bilinear filter (two
batched matmuls), then :meth:`DeviceAugment.apply` runs flip → RandAugment → normalise → RandomErasing on the whole
batch, each sample with its own parameters. A batch's result is therefore a pure function of its samples' seeds
(the erasing noise comes from a device generator seeded by the batch's rows, so it is reproducible per device
type; CPU and CUDA generators differ).

Written here rather than with kornia.augmentation: kornia's RandAugment samples its ops once per call, for the
whole batch, and takes its randomness from torch's global RNG, while GroupViT's recipe (timm ``rand-m9-mstd0.5-inc1``)
draws ops per image and this project needs every random draw reproducible from the sample's seed.

What differs from the CPU path (``augment_on = cpu``, timm semantics on PIL), see ``docs/data.md``: the ops
follow PIL's integer arithmetic (truncating blends, PIL's grey weights, its SMOOTH kernel with the border kept, its
inside/outside test for geometric fills), and tests/test_gpu_augment.py checks every op against PIL to within 1 grey
level; the crop's resize is PIL's filter in floating point (float32: within 1 grey level of PIL's fixed point;
float16 on CUDA: within 2, 0.08 on average), from a
DCT-scaled JPEG decode when the crop is at least twice the target size; the random
draws come in another order (a sign is drawn for every op), so the two paths give different (equally distributed)
streams; the erasing noise is N(0, 1) from a device generator seeded per batch.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from train.transforms import IMAGENET_MEAN, IMAGENET_STD, RandAugment, erasing_box

__all__ = ["DeviceAugment"]

_RESIZE_PIXELS = 1 << 23  # padded region pixels resized per chunk (bounds the device's scratch memory)
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)  # PIL's RGB -> L weights


class DeviceAugment:
    """Flip → RandAugment → normalise → RandomErasing on ``uint8 [B, 3, S, S]`` batches, parameters per sample.

    Args:
        img_size: S.
        augment: ``False``: normalisation only (the CPU half did resize + center crop).
        hflip, rand_augment, re_prob, mean, std: as :class:`train.transforms.TrainTransform`.
    """

    def __init__(
        self,
        img_size: int = 224,
        augment: bool = True,
        *,
        hflip: float = 0.5,
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.img_size, self.augment, self.hflip, self.re_prob = img_size, augment, hflip, re_prob
        self.ra = RandAugment.from_string(rand_augment) if (augment and rand_augment) else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_ops = self.ra.num_ops if self.ra is not None else 0
        self.num_params = 1 + 3 * self.num_ops + 6  # flip | (op, magnitude, sign) x n | erase on/top/left/h/w, seed

    # ---- CPU side, per sample -----------------------------------------------------------------------------------
    def sample_params(self, rng: random.Random) -> np.ndarray:
        """``float64 [P]`` row: flip, then per RandAugment slot (op index or -1, magnitude, sign), then erasing
        (on, top, left, height, width) and a noise seed; every draw from ``rng``."""
        p = np.zeros(self.num_params, np.float64)
        if not self.augment:
            return p
        p[0] = rng.random() < self.hflip
        ra = self.ra
        for j in range(self.num_ops):
            op = rng.randrange(len(ra.OPS))
            on = rng.random() <= ra.prob
            m = rng.gauss(ra.magnitude, ra.magnitude_std) if ra.magnitude_std > 0 else ra.magnitude
            p[1 + 3 * j : 4 + 3 * j] = (op if on else -1, max(0.0, min(10.0, m)), -1.0 if rng.random() > 0.5 else 1.0)
        e = 1 + 3 * self.num_ops
        s = self.img_size
        if self.re_prob > 0 and rng.random() < self.re_prob:  # timm RandomErasing box sampling (one box)
            box = erasing_box(s, s, rng)
            if box is not None:
                p[e : e + 5] = (1, *box)
        p[e + 5] = rng.getrandbits(31)
        return p

    @staticmethod
    def pack_regions(
        regions: Sequence[tuple[np.ndarray, tuple[float, float, float, float]]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`train.transforms.decode_region` results of a batch → (``uint8 [sum h w 3]`` the regions' pixels
        back to back, ``float64 [B, 6]`` rows ``(h, w, x0, y0, x1, y1)``): one copy, no padding."""
        sizes = [r.shape[0] * r.shape[1] * 3 for r, _ in regions]
        flat = np.empty(sum(sizes), np.uint8)
        o = 0
        for (r, _), n in zip(regions, sizes):
            flat[o : o + n].reshape(r.shape)[...] = r
            o += n
        rows = torch.tensor([(r.shape[0], r.shape[1], *box) for r, box in regions], dtype=torch.float64)
        return torch.from_numpy(flat), rows

    # ---- device side, batched -----------------------------------------------------------------------------------
    @torch.no_grad()
    def crop_resize(self, flat: torch.Tensor, rows: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`pack_regions` output (``flat`` on any device, ``rows`` anywhere) → ``uint8 [B, 3, S, S]`` there:
        each box resized with PIL's bilinear (antialiasing) filter, horizontal pass then vertical, each rounded as
        PIL does: matmuls over the regions, sorted by size and zero-padded per chunk, in ``dtype`` (default float16
        on CUDA, tensor cores: within 2 grey levels of PIL, 0.08 on average; float32 elsewhere: within 1)."""
        r = rows.detach().cpu().double()
        if flat.dtype != torch.uint8 or flat.ndim != 1 or r.ndim != 2 or r.shape[1] != 6:
            raise ValueError(
                f"DeviceAugment.crop_resize: expected flat uint8 [N] and rows [B, 6], got {flat.dtype} "
                f"{list(flat.shape)} and {list(rows.shape)}"
            )
        hw = r[:, :2].long()
        n_px = hw[:, 0] * hw[:, 1]
        if int(n_px.sum()) * 3 != flat.numel():
            raise ValueError(
                f"DeviceAugment.crop_resize: rows describe {int(n_px.sum()) * 3} bytes, flat has {flat.numel()}"
            )
        dev, s = flat.device, self.img_size
        dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        px = flat.view(-1, 3)
        starts = (n_px.cumsum(0) - n_px).tolist()
        hs, ws = hw[:, 0].tolist(), hw[:, 1].tolist()
        order = sorted(range(len(r)), key=lambda k: (hs[k], ws[k]))  # similar sizes share a chunk: less padding
        out = torch.empty(len(r), 3, s, s, dtype=torch.uint8, device=dev)
        i = 0
        while i < len(order):  # chunks of samples whose padded regions fit _RESIZE_PIXELS
            j, h_pad, w_pad = i + 1, hs[order[i]], ws[order[i]]
            while (
                j < len(order) and (j + 1 - i) * max(h_pad, hs[order[j]]) * max(w_pad, ws[order[j]]) <= _RESIZE_PIXELS
            ):
                h_pad, w_pad, j = max(h_pad, hs[order[j]]), max(w_pad, ws[order[j]]), j + 1
            sel = order[i:j]
            h = torch.tensor([hs[k] for k in sel], device=dev)
            w = torch.tensor([ws[k] for k in sel], device=dev)
            yy = torch.arange(h_pad, device=dev).view(1, -1, 1)
            xx = torch.arange(w_pad, device=dev).view(1, 1, -1)
            idx = torch.tensor([starts[k] for k in sel], device=dev).view(-1, 1, 1) + yy * w.view(-1, 1, 1) + xx
            img = px[idx.clamp_(max=px.shape[0] - 1)].permute(0, 3, 1, 2).to(dtype)  # [n, 3, Hp, Wp], pad: weight 0
            box = r[sel, 2:].to(dev, torch.float32)
            wx = _pil_bilinear_weights(box[:, 0], box[:, 2], w, w_pad, s).to(dtype)  # [n, S, Wp]
            wy = _pil_bilinear_weights(box[:, 1], box[:, 3], h, h_pad, s).to(dtype)  # [n, S, Hp]
            t = (img @ wx.transpose(1, 2)[:, None]).add_(0.5).floor_().clamp_(0, 255)  # [n, 3, Hp, S]
            out[torch.tensor(sel, device=dev)] = (wy[:, None] @ t).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)
            i = j
        return out

    @torch.no_grad()
    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, S, S]`` (any device) + ``[B, P]`` rows → normalised ``float32 [B, 3, S, S]`` there."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DeviceAugment.apply: expected uint8 [B, 3, S, S], got {images.dtype} {list(images.shape)}"
            )
        if params.shape != (images.shape[0], self.num_params):
            raise ValueError(
                f"DeviceAugment.apply: expected params [{images.shape[0]}, {self.num_params}], got {list(params.shape)}"
            )
        dev = images.device
        cpu = params.detach().cpu().double()  # group samples by op on the host: no device syncs
        x = images.float()  # [B, 3, S, S] in 0..255
        if self.augment:
            flip = cpu[:, 0] > 0
            if bool(flip.any()):
                idx = flip.nonzero().flatten().to(dev)
                x[idx] = x[idx].flip(-1)
            for j in range(self.num_ops):
                x = self._rand_augment_slot(x, cpu[:, 1 + 3 * j : 4 + 3 * j])
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        x = (x / 255 - mean) / std
        e = 1 + 3 * self.num_ops
        on = cpu[:, e] > 0
        if self.augment and bool(on.any()):
            seed = int(cpu[:, e + 5].sum().item()) % (2**62)
            gen = torch.Generator(device=dev).manual_seed(seed)
            noise = torch.randn(x.shape, generator=gen, device=dev)
            box = cpu[:, e : e + 5].to(dev)  # on, top, left, h, w
            s = torch.arange(x.shape[-1], device=dev, dtype=torch.float64)
            rows = (s[None] >= box[:, 1:2]) & (s[None] < box[:, 1:2] + box[:, 3:4])  # [B, S]
            cols = (s[None] >= box[:, 2:3]) & (s[None] < box[:, 2:3] + box[:, 4:5])
            mask = (rows[:, :, None] & cols[:, None, :] & (box[:, 0:1, None] > 0))[:, None]  # [B, 1, S, S]
            x = torch.where(mask, noise, x)
        return x.contiguous()

    def _rand_augment_slot(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """One RandAugment op per sample; ``p`` = ``[B, 3]`` (op index or -1, magnitude, sign) on the host."""
        dev = x.device
        ops = self.ra.OPS
        geo = [i for i in range(len(ops)) if ops[i] in _GEOMETRIC]
        op = p[:, 0].long()
        sel = torch.isin(op, torch.tensor(geo)).nonzero().flatten()
        if sel.numel():
            x[sel.to(dev)] = _affine(
                x[sel.to(dev)], _thetas([ops[i] for i in op[sel].tolist()], p[sel, 1], p[sel, 2]).to(dev), self.ra.fill
            )
        for k, name in enumerate(ops):
            if name in _GEOMETRIC:
                continue
            sel = (op == k).nonzero().flatten()
            if sel.numel():
                i = sel.to(dev)
                m = p[sel, 1].to(dev, torch.float32).view(-1, 1, 1, 1)
                sign = p[sel, 2].to(dev, torch.float32).view(-1, 1, 1, 1)
                x[i] = _COLOR_OPS[name](x[i], m, sign).round().clamp(0, 255)
        return x


def _pil_bilinear_weights(
    lo: torch.Tensor, hi: torch.Tensor, n_valid: torch.Tensor, n_pad: int, out: int
) -> torch.Tensor:
    """``[n, out, n_pad]`` resampling rows of PIL's bilinear resize of the span ``[lo, hi)`` (``[n]``) to ``out``
    samples (Resample.c: triangle of half-width ``max(1, scale)`` around each output centre, input pixels
    ``>= n_valid`` excluded, each row normalised to 1)."""
    scale = (hi - lo) / out  # [n]
    support = scale.clamp(min=1.0)
    centre = lo[:, None] + (torch.arange(out, device=lo.device) + 0.5) * scale[:, None]  # [n, out]
    x = torch.arange(n_pad, device=lo.device)
    wgt = (1 - (x + 0.5 - centre[:, :, None]).abs() / support[:, None, None]).clamp_(min=0)
    wgt = wgt * (x < n_valid[:, None, None])
    return wgt / wgt.sum(-1, keepdim=True).clamp_(min=1e-12)


# ---- geometric ops: one affine grid_sample for all of them --------------------------------------------------------
def _thetas(names: list[str], mags: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``[n, 2, 3]`` affine_grid matrices (align_corners=False, square images) of PIL's affine maps
    ``p_in = A p_out + t`` in pixel units (pixel centres at +0.5), ``t`` given as a fraction of the side."""
    out = []
    for name, m, sg in zip(names, mags.tolist(), signs.tolist()):
        a, t = np.eye(2), np.zeros(2)
        if name == "Rotate":  # PIL rotate: counter-clockwise by `deg` about the centre
            r = -math.radians(sg * m / 10 * 30)
            a = np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])
            t = 0.5 - a @ np.array([0.5, 0.5])  # centre maps to centre (in side fractions)
        elif name == "ShearX":
            a = np.array([[1.0, sg * m / 10 * 0.3], [0.0, 1.0]])
        elif name == "ShearY":
            a = np.array([[1.0, 0.0], [sg * m / 10 * 0.3, 1.0]])
        elif name == "TranslateXRel":
            t = np.array([sg * m / 10 * 0.45, 0.0])
        else:  # TranslateYRel
            t = np.array([0.0, sg * m / 10 * 0.45])
        # normalised coords u = 2 p / S - 1: u_in = A u_out + (A 1 + 2 t - 1)
        out.append(np.concatenate([a, (a @ np.ones(2) + 2 * t - 1)[:, None]], axis=1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


def _affine(x: torch.Tensor, theta: torch.Tensor, fill: Sequence[int]) -> torch.Tensor:
    """PIL's bilinear affine transform: a pixel whose source point lies outside the image gets ``fill``, the others
    interpolate with the edge pixels repeated."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [n, S, S, 2] in [-1, 1) inside
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(-1, keepdim=True).permute(0, 3, 1, 2)  # [n, 1, S, S]
    fill_t = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return torch.where(inside, out, fill_t).floor().clamp(0, 255)


# ---- colour ops on float 0..255 [n, 3, S, S]; m, sign: [n, 1, 1, 1] ----------------------------------------------
def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).round()  # [n, 1, S, S]


def _factor(m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (1.0 + sign * m / 10 * 0.9).clamp(min=0.1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (degenerate + f * (x - degenerate)).floor()  # PIL truncates blends to integers


def _autocontrast(x, m, sign):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scale = 255 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, ((x - lo) * scale).floor(), x)


def _equalize(x, m, sign):
    n, c, h, w = x.shape
    v = x.long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    last = hist.gather(1, v.amax(1, keepdim=True))  # count of the largest value present (PIL: last nonzero bin)
    step = (h * w - last) // 255  # [n*c, 1]
    cum = hist.cumsum(1) - hist  # exclusive cumulative histogram
    lut = ((step // 2 + cum) // step.clamp(min=1)).clamp(max=255)
    out = lut.gather(1, v).to(x.dtype)
    return torch.where(step > 0, out, v.to(x.dtype)).view(n, c, h, w)


def _posterize(x, m, sign):
    shift = 8 - (4 - (m / 10 * 4).floor())  # bits kept = 4 - int(m / 10 * 4)
    q = torch.pow(2.0, shift)
    return (x / q).floor() * q


def _solarize(x, m, sign):
    return torch.where(x >= 256 - (m / 10 * 256).floor(), 255 - x, x)


def _solarize_add(x, m, sign):
    return torch.where(x < 128, (x + (m / 10 * 110).floor()).clamp(max=255), x)


def _sharpness(x, m, sign):
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    smooth = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), k.view(1, 1, 3, 3)).round().view(*x.shape[:2], x.shape[2] - 2, -1)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth  # PIL keeps the border pixels
    return _blend(degenerate, x, _factor(m, sign))


_COLOR_OPS = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda x, m, sign: 255 - x,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": lambda x, m, sign: _blend(_grey(x), x, _factor(m, sign)),
    "ContrastIncreasing": lambda x, m, sign: _blend(
        _grey(x).mean((1, 2, 3), keepdim=True).add(0.5).floor(), x, _factor(m, sign)
    ),
    "BrightnessIncreasing": lambda x, m, sign: (x * _factor(m, sign)).floor(),
    "SharpnessIncreasing": _sharpness,
}
