"""Pictures of segmentations, the one home of the drawing code (``groupvit-segment`` and the training demo use it).

* :func:`label_colors`: one colour per label that keeps classes apart; a class named by a colour word ("red",
  "a blue circle") is drawn in that colour, the background (label 0) black;
* :func:`distinct_colors`: well-separated colours (golden-ratio hue steps) for classes or group indices;
* :func:`tint`: the image blended with the label colours (background left as it is);
* :func:`legend`: colour boxes with their names; :func:`overlay_with_legend` and :func:`panel_figure` are the two
  figures (one image with a legend at its right; titled panels in a grid with one legend below). Small images are
  scaled up (nearest neighbour, an integer factor) so that every figure is readable.
"""

from __future__ import annotations

import colorsys
import re
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLOR_WORDS",
    "display_scale",
    "distinct_colors",
    "label_colors",
    "legend",
    "mask_image",
    "overlay_with_legend",
    "panel_figure",
    "tint",
]

# sRGB of the colour words a class name may contain (their common screen meaning)
COLOR_WORDS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 215, 40),
    "orange": (245, 135, 25),
    "purple": (140, 50, 180),
    "violet": (150, 90, 210),
    "pink": (245, 130, 185),
    "brown": (135, 80, 35),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
    "cyan": (20, 200, 220),
    "magenta": (215, 30, 190),
    "teal": (0, 128, 128),
    "navy": (20, 30, 120),
    "gold": (215, 170, 20),
    "beige": (225, 205, 160),
    "lime": (140, 225, 40),
    "olive": (120, 120, 30),
    "maroon": (120, 20, 30),
}
BACKGROUND = (0, 0, 0)
MIN_SIDE = 256  # figures scale images whose short side is below this up by an integer factor
_MIN_DIST = 80.0  # RGB distance below which a generated colour counts as too close to one already used


def _color_word(name: str) -> tuple[int, int, int] | None:
    """The colour of the first colour word in ``name`` ("a light blue car" -> blue), else ``None``."""
    for word in re.findall(r"[a-z]+", name.lower()):
        if word in COLOR_WORDS:
            return COLOR_WORDS[word]
    return None


def _hue_colors() -> Iterator[tuple[int, int, int]]:
    """Endless well-spread colours: golden-ratio hue steps, alternating two brightness levels."""
    i = 0
    while True:
        r, g, b = colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.75, 0.95 - 0.3 * (i % 2))
        yield round(255 * r), round(255 * g), round(255 * b)
        i += 1


def distinct_colors(n: int, avoid: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """``n`` colours ``uint8 [n, 3]`` far (RGB distance >= 80) from each other and from ``avoid`` while such colours
    are found among the first few hundred candidates; then the next candidates as they come."""
    used = [np.asarray(c, np.float64) for c in avoid]
    out: list[tuple[int, int, int]] = []
    gen = _hue_colors()
    for tries in range(64 * n + 256):
        if len(out) == n:
            break
        c = next(gen)
        if tries > 32 * n or all(np.linalg.norm(np.asarray(c) - u) >= _MIN_DIST for u in used):
            out.append(c)
            used.append(np.asarray(c, np.float64))
    while len(out) < n:
        out.append(next(gen))
    return np.asarray(out, np.uint8).reshape(n, 3)


def label_colors(labels: Sequence[str], background: bool = True) -> np.ndarray:
    """Colours ``uint8 [len(labels), 3]`` of the label names: label 0 black when it is the ``background``; names
    with a colour word take that colour; the others get :func:`distinct_colors` away from all of these."""
    fixed: dict[int, tuple[int, int, int]] = {0: BACKGROUND} if background and labels else {}
    for i, name in enumerate(labels):
        if i not in fixed and (c := _color_word(name)) is not None:
            fixed[i] = c
    free = [i for i in range(len(labels)) if i not in fixed]
    colors = np.zeros((len(labels), 3), np.uint8)
    for i, c in fixed.items():
        colors[i] = c
    colors[free] = distinct_colors(len(free), avoid=list(fixed.values()))
    return colors


def mask_image(labels: np.ndarray, colors: np.ndarray) -> Image.Image:
    """Palette image: pixel value = label (``0..255``), palette = ``colors``."""
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"mask_image: labels must lie in 0..255, got {labels.min()}..{labels.max()}")
    h, w = labels.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(colors)] = colors[:256]
    im.putpalette(pal.reshape(-1).tolist())
    return im


def tint(
    rgb: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float = 0.55, background: bool = True
) -> np.ndarray:
    """``uint8 [H, W, 3]``: ``rgb * (1 - alpha) + colors[labels] * alpha``; with ``background`` label-0 pixels keep
    the image's own colour."""
    base = rgb.astype(np.float32)
    mix = base * (1 - alpha) + colors.astype(np.float32)[labels] * alpha
    if background:
        mix = np.where((labels == 0)[..., None], base, mix)
    return mix.round().clip(0, 255).astype(np.uint8)


def display_scale(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """Integer upscaling factor that brings the short side to at least ``min_side`` (1 for larger images)."""
    return max(1, -(-min_side // max(1, min(height, width))))


def _upscale(img: np.ndarray, k: int) -> np.ndarray:
    return img if k == 1 else np.repeat(np.repeat(img, k, axis=0), k, axis=1)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def legend(
    entries: Sequence[tuple[Sequence[int] | None, str]], size: int = 12, width: int | None = None
) -> Image.Image:
    """Colour boxes with their text, ``entries = [(rgb or None for text only, text)]``: one entry per line, or, with
    ``width``, left to right wrapped at ``width`` pixels."""
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, box, row = max(2, size // 3), size, int(size * 1.6) + 2
    cells = [((box + pad) if c is not None else 0) + int(probe.textlength(t, font=font)) for c, t in entries]
    places, x, y = [], pad, pad
    for w in cells:
        if width is not None and x > pad and x + w > width - pad:
            x, y = pad, y + row
        places.append((x, y))
        x = x + w + 2 * pad if width is not None else pad
        y = y if width is not None else y + row
    last = places[-1][1] + row if places else pad
    w_all = width if width is not None else pad * 2 + max(cells, default=0)
    im = Image.new("RGB", (w_all, last + pad // 2), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for (c, t), (x, y) in zip(entries, places):
        if c is not None:
            draw.rectangle([x, y + 1, x + box, y + 1 + box], fill=tuple(int(v) for v in c), outline=(0, 0, 0))
            x += box + pad
        draw.text((x, y), t, fill=(0, 0, 0), font=font)
    return im


def overlay_with_legend(
    rgb: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    colors: np.ndarray,
    background: bool = True,
    alpha: float = 0.55,
) -> Image.Image:
    """The image tinted by label colour (:func:`tint`), scaled up if small (:func:`display_scale`), with a legend at
    its right listing the labels present, largest first, as colour box + name + pixel share."""
    k = display_scale(*labels.shape)
    img = _upscale(tint(rgb, labels, colors, alpha, background), k)
    h, w = img.shape[:2]
    present = np.bincount(labels.reshape(-1), minlength=len(names))
    order = [int(i) for i in np.argsort(-present, kind="stable") if present[i] > 0]
    leg = legend(
        [(colors[i], f"{names[i]} ({100 * present[i] / labels.size:.1f}%)") for i in order],
        size=max(12, min(h, w) // 28),
    )
    canvas = Image.new("RGB", (w + leg.width, max(h, leg.height)), (255, 255, 255))
    canvas.paste(Image.fromarray(img), (0, 0))
    canvas.paste(leg, (w, 0))
    return canvas


def panel_figure(
    tiles: Sequence[tuple[str, np.ndarray]],
    legend_entries: Sequence[tuple[Sequence[int] | None, str]],
    caption: str = "",
    cols: int = 4,
    scale: int | None = None,
) -> Image.Image:
    """Titled panels (``[(title, uint8 [H, W, 3])]``, all one size) in a grid of ``cols`` columns, each scaled by
    ``scale`` (default :func:`display_scale`), the caption on top and one legend below."""
    h, w = tiles[0][1].shape[:2]
    s = scale or display_scale(h, w, MIN_SIDE // 2)
    gap, title, top = 4, 14, 16
    cw, ch = w * s + gap, h * s + title
    rows = -(-len(tiles) // cols)
    width = cols * cw - gap
    leg = legend(legend_entries, size=10, width=width)
    canvas = Image.new("RGB", (width, top + rows * ch + leg.height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), caption, fill=(0, 0, 0))
    for k, (name, t) in enumerate(tiles):
        x, y = (k % cols) * cw, top + (k // cols) * ch
        draw.text((x + 2, y), name, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(_upscale(np.asarray(t, np.uint8), s)), (x, y + title))
    canvas.paste(leg, (0, top + rows * ch))
    return canvas
