"""groupvit.drawing: colours that keep classes apart (colour words drawn in their colour), tinting, upscaling of
small images, one legend per figure."""

from __future__ import annotations

import numpy as np
import pytest

from groupvit import drawing


def test_colour_words_take_their_colour():
    names = ["background", "yellow", "orange", "a light blue car", "cat", "Red", "sofa"]
    c = drawing.label_colors(names).astype(int)
    assert c[0].tolist() == [0, 0, 0]
    assert c[1].tolist() == [235, 215, 40] and c[2].tolist() == [245, 135, 25]  # not VOC's navy and teal
    assert c[3].tolist() == [40, 75, 215] and c[5].tolist() == [215, 35, 35]
    for i in (4, 6):  # other names: away from the colour words and the background
        assert min(np.linalg.norm(c[i] - c[j]) for j in range(len(names)) if j != i) >= 80
    without_bg = drawing.label_colors(["cat", "dog"], background=False)
    assert (without_bg.astype(int).sum(axis=1) > 0).all()  # no class drawn black when there is no background


def test_generated_colours_are_apart():
    c = drawing.distinct_colors(12).astype(float)
    d = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.eye(12) * 1e9
    assert d.min() >= 80
    many = drawing.distinct_colors(300)
    assert many.shape == (300, 3) and len(np.unique(many[:40], axis=0)) == 40


def test_tint_keeps_the_background():
    rgb = np.full((5, 7, 3), 100, np.uint8)
    lab = np.zeros((5, 7), np.int64)
    lab[2:, 3:] = 1
    colors = np.array([[0, 0, 0], [200, 0, 0]], np.uint8)
    t = drawing.tint(rgb, lab, colors, alpha=0.5)
    assert (t[lab == 0] == 100).all() and t[lab == 1].tolist() == [[150, 50, 50]] * int((lab == 1).sum())
    assert (drawing.tint(rgb, lab, colors, alpha=0.5, background=False)[lab == 0] == 50).all()


@pytest.mark.parametrize("size", [(64, 64), (40, 90), (300, 500)])
def test_overlay_scales_small_images_above_their_legend(size):
    h, w = size
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    lab = rng.integers(0, 4, (h, w))
    names = ["background", "red", "cat", "dog"]
    colors = drawing.label_colors(names)
    im = np.asarray(drawing.overlay_with_legend(rgb, lab, names, colors))
    k = drawing.display_scale(h, w)
    assert k == (1 if min(h, w) >= drawing.MIN_SIDE else -(-drawing.MIN_SIDE // min(h, w)))
    assert im.shape[0] == max(h * k, im.shape[0]) and im.shape[0] == h * k  # the legend fits beside the picture
    left = im[: h * k, : w * k]
    np.testing.assert_array_equal(left[::k, ::k], drawing.tint(rgb, lab, colors))  # nearest-neighbour upscale
    legend = im[:, w * k :].reshape(-1, 3)
    for c in colors:
        assert (legend == c).all(axis=1).sum() >= 25  # one box per label present


def test_panel_figure_has_one_legend_below():
    tiles = [(f"t{i}", np.full((32, 32, 3), 40 * i, np.uint8)) for i in range(5)]
    entries = [((215, 35, 35), "red"), ((40, 75, 215), "blue"), (None, "| note")]
    im = np.asarray(drawing.panel_figure(tiles, entries, caption="a red circle", scale=3))
    top, title, gap = 16, 14, 4
    rows_h = 2 * (32 * 3 + title)
    assert im.shape[1] == 4 * (32 * 3 + gap) - gap
    body, legend = im[: top + rows_h].reshape(-1, 3), im[top + rows_h :].reshape(-1, 3)
    assert (legend == (215, 35, 35)).all(axis=1).sum() >= 25 and (body == (215, 35, 35)).all(axis=1).sum() == 0
    assert (im[top + title : top + title + 96, :96] == 0).all()  # tile 0 scaled 3x
