"""groupvit.imageio: high-bit-depth modes scaled by value (training and segmentation share it), the pixel cap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from groupvit.imageio import ImageTooLarge, decode_array, decode_image, image_size, open_image
from groupvit.segmentation import load_image

RNG = np.random.default_rng(3)
G16 = RNG.integers(0, 65536, (9, 11), dtype=np.uint16)
EXPECT = np.round(G16 / 257.0).astype(np.uint8)  # 0..65535 -> 0..255


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["png-I;16", "tiff-I", "tiff-F-unit", "tiff-F-16bit"])
def test_wide_modes_scaled_by_value(case):
    if case == "png-I;16":
        img, fmt = Image.fromarray(G16), "PNG"
    elif case == "tiff-I":
        img, fmt = Image.fromarray(G16.astype(np.int32)), "TIFF"
    elif case == "tiff-F-unit":
        img, fmt = Image.fromarray((G16 / 65535.0).astype(np.float32)), "TIFF"
    else:
        img, fmt = Image.fromarray(G16.astype(np.float32)), "TIFF"
    data = _encoded(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == {"png-I;16": "I;16", "tiff-I": "I"}.get(case, "F")
    out = np.array(decode_image(data))
    assert out.shape == (9, 11, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - EXPECT[..., None]).max() <= 1, case


def test_segmentation_reads_16bit_png_by_value(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(G16).save(path)
    rgb = load_image(path)
    np.testing.assert_array_equal(rgb, np.repeat(EXPECT[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_image(Image.open(path)), rgb)  # a PIL image in I;16 mode too
    assert (rgb == 255).mean() < 0.05  # PIL's own convert("RGB") made ~99.6 % of these pixels 255


def test_pixel_cap_before_decoding(tmp_path):
    data = _encoded(Image.new("1", (10_000, 10_000)), "PNG")  # 100 M pixels in ~12 KB
    assert len(data) < 150_000
    with pytest.raises(ImageTooLarge, match="10000x10000 = 100,000,000 pixels is above the cap"):
        open_image(data)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="above the cap"):
        load_image(path)
    assert open_image(data, max_pixels=None).size == (10_000, 10_000)  # header only: nothing decoded


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_decode_array_jpeg_pixels_are_pils():
    """libjpeg-turbo through simplejpeg gives PIL's pixels bit for bit (colour 4:2:0 and 4:4:4, grey, progressive);
    PNG and 16-bit grey go through PIL and are scaled by value as decode_image does."""
    rgb = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cases = [_jpeg(rgb), _jpeg(rgb, subsampling=0), _jpeg(rgb[..., 0]), _jpeg(rgb, progressive=True)]
    cases += [_encoded(Image.fromarray(rgb), "PNG"), _encoded(Image.fromarray(G16), "PNG")]
    for data in cases:
        out = decode_array(data)
        assert out.dtype == np.uint8 and out.shape[2] == 3 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, np.asarray(decode_image(data)))
        assert image_size(data) == (out.shape[1], out.shape[0])


def test_decode_array_dct_scaled_and_capped():
    data = _jpeg(RNG.integers(0, 256, (400, 640, 3), dtype=np.uint8))
    # the smallest of libjpeg-turbo's scale factors (k/8, k = 1..16) that keeps at least min_size
    for min_size, shape in (
        ((300, 200), (200, 320)),
        ((100, 60), (100, 160)),
        ((200, 90), (150, 240)),
        ((1, 1), (50, 80)),
    ):
        assert decode_array(data, min_size=min_size).shape == (*shape, 3), min_size
    with pytest.raises(ImageTooLarge, match="640x400 = 256,000 pixels is above the cap of 1,000 pixels"):
        image_size(data, max_pixels=1000)
    with pytest.raises(ImageTooLarge, match="above the cap"):
        decode_array(data, max_pixels=1000)
