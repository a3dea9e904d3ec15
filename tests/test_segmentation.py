"""Zero-shot segmentation protocol (docs/groupvit.md §10.1-10.2): each piece against a direct computation or a
hand-built case, slide-vs-whole agreement, batching, sizes, backends and checkpoint formats."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import groupvit
from groupvit import ops
from groupvit.grouping import GroupingMaps
from groupvit.model import ImageGroups
from groupvit.segmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegConfig,
    ZeroShotSegmenter,
    class_embeddings,
    crop_scores,
    group_class_probs,
    pixel_group_map,
    rescale_size,
    slide_windows,
)
from groupvit.tokenizer import tokenize
from kernels.reference import clamped_scale

SMALL = dict(crop=32, stride=16, short_side=48)  # tiny-model sizes (patch 4, trained at 32x32)


@pytest.fixture(scope="module")
def tiny() -> groupvit.GroupViT:
    torch.manual_seed(1234)
    return groupvit.create_model("groupvit-tiny").eval()


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- §10.1 class embeddings ------------------------------------------------------------------------------------


def test_tokenizer_is_clip_bpe():
    ids = tokenize(["a photo of a cat"], context_length=77)
    assert ids.shape == (1, 77)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]  # environment.md §6 (open_clip)


def test_template_average_before_normalise(tiny):
    names = ["cat", "traffic light", "dining table"]
    templates = ("a photo of a {}.", "itap of a {}.", "art of the {}.")
    got = class_embeddings(tiny, names, templates)
    tok = tokenize
    ctx = tiny.cfg.text.context_length
    with torch.no_grad():
        for i, name in enumerate(names):
            proj = torch.stack([tiny.encode_text(tok([t.format(name)], context_length=ctx))[0] for t in templates])
            want = proj.mean(0) / proj.mean(0).norm()
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
            clip_order = F.normalize(F.normalize(proj, dim=-1).mean(0), dim=0)  # the order GroupViT does NOT use
            assert (got[i] - clip_order).abs().max() > 1e-4
    assert tiny.training is False


def test_class_embeddings_keep_training_flag(tiny):
    tiny.train()
    try:
        a = class_embeddings(tiny, ["dog"])
        assert tiny.training  # restored
    finally:
        tiny.eval()
    torch.testing.assert_close(a, class_embeddings(tiny, ["dog"]))  # computed in eval mode (BN running stats)


# ---- §10.2 steps 4-6: affinity and top-k filter -----------------------------------------------------------------


def _probs_reference(group, image, text, scale, topk):
    """Direct per-element computation in float64 NumPy."""
    g = group.double().numpy()
    im = image.double().numpy()
    t = text.double().numpy()
    g = g / np.linalg.norm(g, axis=-1, keepdims=True)
    im = im / np.linalg.norm(im, axis=-1, keepdims=True)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    b_, gn, n = g.shape[0], g.shape[1], t.shape[0]
    out = np.zeros((b_, gn, n))
    for b in range(b_):
        img_logit = scale * im[b] @ t.T
        img_p = np.exp(img_logit - img_logit.max())
        img_p /= img_p.sum()
        kept = set(np.argsort(-img_p)[: min(topk, n)].tolist())
        for j in range(gn):
            lg = scale * g[b, j] @ t.T
            full = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
            ks = sorted(kept)
            sub = np.exp(lg[ks] - lg[ks].max())
            sub /= sub.sum()
            for c_i, c in enumerate(ks):
                out[b, j, c] = sub[c_i] * full[c]
    return out


@pytest.mark.parametrize("b,g,n,d,topk", [(2, 7, 9, 13, 5), (1, 8, 3, 16, 5), (3, 5, 11, 6, 1), (1, 4, 6, 5, 6)])
def test_group_class_probs_matches_direct(b, g, n, d, topk):
    gen = torch.Generator().manual_seed(b * 100 + n)
    group, image, text = (
        torch.randn(b, g, d, generator=gen),
        torch.randn(b, d, generator=gen),
        torch.randn(n, d, generator=gen) * 3,
    )
    scale = 14.3
    got = group_class_probs(group, image, text, scale, topk)
    assert got.shape == (b, g, n)
    np.testing.assert_allclose(
        got.double().numpy(), _probs_reference(group, image, text, scale, topk), rtol=2e-5, atol=1e-7
    )
    assert ((got > 0).sum(-1) == min(topk, n)).all()  # exactly k classes survive the filter


def test_topk_filter_constructed():
    text = torch.eye(6)  # class c = basis vector c
    image = torch.tensor([[0.2, 0.9, 0.1, 0.8, 0.0, 0.3]])  # image-level ranking: 1, 3, 5, 0, ...
    group = torch.tensor(
        [
            [
                [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # points at class 2: filtered out at topk=2
                [0.0, 1.0, 0.0, 1.0, 0.0, 0.0],
            ]
        ]
    )
    got = group_class_probs(group, image, text, 10.0, topk=2)
    assert torch.all(got[..., [0, 2, 4, 5]] == 0)
    # group 1: cosines 1/sqrt2 with classes 1 and 3 -> Pi' = (1/2, 1/2); Pi = e^(10/sqrt2) / (2 e^(10/sqrt2) + 4)
    e = np.exp(10 / np.sqrt(2))
    np.testing.assert_allclose(got[0, 1, [1, 3]].numpy(), [0.5 * e / (2 * e + 4)] * 2, rtol=1e-5)
    # group 0: cosine 0 with both kept classes -> Pi' = (1/2, 1/2), Pi = 1 / (e^10 + 5) for each
    np.testing.assert_allclose(got[0, 0, [1, 3]].numpy(), [0.5 / (np.exp(10) + 5)] * 2, rtol=1e-5)


# ---- §10.2 step 7: scores and background ------------------------------------------------------------------------


def test_background_threshold_constructed():
    probs = torch.tensor(
        [
            [
                [0.50, 0.10],  # group 0: the window's max Pi''
                [0.20, 0.30],
                [0.05, 0.02],
            ]
        ]
    )
    gidx = torch.tensor([[[0, 1, 2], [2, 1, 0]]])  # [1, 2, 3]
    s = crop_scores(gidx, probs, bg_thresh=0.95)  # threshold min(0.95, 0.5) = 0.5: only group 0 stays foreground
    assert s.shape == (1, 3, 2, 3)
    assert s[0, 0].tolist() == [[0, 1, 1], [1, 1, 0]]
    s = crop_scores(gidx, probs, bg_thresh=0.25)  # threshold 0.25: groups 0 (0.5) and 1 (0.3) foreground
    assert s[0, 0].tolist() == [[0, 0, 1], [1, 0, 0]]
    s = crop_scores(gidx, probs, bg_thresh=0.3)  # max_c P == threshold for group 1: strict '<' keeps it foreground
    assert s[0, 0].tolist() == [[0, 0, 1], [1, 0, 0]]
    assert crop_scores(gidx, probs, bg_thresh=None).shape == (1, 2, 2, 3)


def test_crop_scores_equal_one_hot_product():
    gen = torch.Generator().manual_seed(3)
    b, g, n, h, w = 3, 5, 7, 9, 11
    probs = torch.rand(b, g, n, generator=gen) * torch.tensor([1.0, 0.2, 0.5])[:, None, None]
    gidx = torch.randint(0, g, (b, h, w), generator=gen)
    got = crop_scores(gidx, probs, bg_thresh=0.95)
    onehot = F.one_hot(gidx, g).float()  # O [B, H, W, G]
    fg = torch.einsum("bhwg,bgn->bnhw", onehot, probs)
    torch.testing.assert_close(got[:, 1:], fg)
    for i in range(b):  # the threshold is per window (its own max Pi'')
        thr = min(0.95, float(probs[i].max()))
        assert torch.equal(got[i, 0], (fg[i].max(0).values < thr).float())


# ---- §10.2 step 3: pixel -> group map ---------------------------------------------------------------------------


def _bilinear_np(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """align_corners=False bilinear resize of [C, h, w] (half-pixel centres, edge clamp), written out."""
    c, h, w = x.shape

    def coords(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = coords(out_h, h)
    x0, x1, fx = coords(out_w, w)
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bot = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


def test_pixel_group_map_matches_direct():
    gen = torch.Generator().manual_seed(5)
    b, (h, w), g1, g2, size = 2, (3, 5), 6, 4, (13, 19)
    s1 = torch.softmax(torch.randn(b, g1, h * w, generator=gen) * 3, dim=1)  # [B, G1, N], softmax over groups
    s2 = torch.softmax(torch.randn(b, g2, g1, generator=gen) * 3, dim=1)  # [B, G2, G1]
    got = pixel_group_map([s1, s2], (h, w), size)
    assert got.shape == (b, *size)
    for i in range(b):
        m = s1[i].double().numpy().T @ s2[i].double().numpy().T  # [N, G2]
        up = _bilinear_np(m.T.reshape(g2, h, w), *size)
        np.testing.assert_array_equal(got[i].numpy(), up.argmax(0))


def test_pixel_group_map_rejects_bad_maps():
    with pytest.raises(ValueError, match="no grouping maps"):
        pixel_group_map([], (2, 2), (8, 8))
    with pytest.raises(ValueError, match="grid"):
        pixel_group_map([torch.rand(1, 4, 5)], (2, 2), (8, 8))
    with pytest.raises(ValueError, match="do not chain"):
        pixel_group_map([torch.rand(1, 4, 4), torch.rand(1, 2, 3)], (2, 2), (8, 8))


# ---- §10.2 steps 1-2: sizes and windows -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw,want",
    [
        ((375, 500), (448, 597)),
        ((513, 513), (448, 448)),
        ((100, 3000), (68, 2048)),
        ((20, 30), (448, 672)),
        ((500, 375), (597, 448)),
    ],
)
def test_rescale_size(hw, want):
    assert rescale_size(*hw, 448, 2048) == want


def test_slide_windows_official_counts():
    assert slide_windows(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    assert [len(slide_windows(h, 448, 448, 224)) for h in (448, 449, 672, 673, 896, 897)] == [1, 2, 2, 3, 3, 4]
    assert slide_windows(300, 200, 448, 224) == [(0, 300, 0, 200)]  # smaller than one crop: one window


@pytest.mark.parametrize("h,w,crop,stride", [(97, 61, 32, 16), (33, 33, 32, 7), (50, 20, 32, 32), (32, 32, 32, 16)])
def test_slide_windows_cover_and_align(h, w, crop, stride):
    wins = slide_windows(h, w, crop, stride)
    cover = np.zeros((h, w), int)
    for y1, y2, x1, x2 in wins:
        assert y2 - y1 == min(crop, h) and x2 - x1 == min(crop, w)
        assert (y1 % stride == 0 or y2 == h) and (x1 % stride == 0 or x2 == w)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    ny = max(h - crop + stride - 1, 0) // stride + 1
    nx = max(w - crop + stride - 1, 0) // stride + 1
    assert len(wins) == ny * nx


# ---- stitching: slide vs whole ----------------------------------------------------------------------------------


def test_slide_equals_whole_on_one_crop(tiny):
    img = _image(32, 32, 0)
    cfg = SegConfig(crop=32, stride=16, short_side=None)
    names = ["cat", "dog", "person", "car", "tree", "sky"]
    slide = ZeroShotSegmenter(tiny, names, cfg).predict_scores(img)
    whole = ZeroShotSegmenter(tiny, names, cfg.replace(mode="whole")).predict_scores(img)
    assert slide.shape == (7, 32, 32)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


class BlockModel(nn.Module):
    """Translation-consistent stand-in: each 4x4 patch belongs to the group coded in its red value
    (``R = 5 * group + 3``); group embeddings are fixed per group and the image embedding is constant, so the
    score of a pixel does not depend on which window it is seen in."""

    class _Cfg:
        class vision:
            patch_size = 4

    def __init__(self, groups: int, dim: int = 8) -> None:
        super().__init__()
        self.cfg = self._Cfg()
        gen = torch.Generator().manual_seed(9)
        self.register_buffer("group_emb", torch.randn(groups, dim, generator=gen))
        self.register_buffer("image_emb", torch.randn(dim, generator=gen))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image_groups(self, images, *, return_maps=True):
        b, _, h, w = images.shape
        red = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # [B, H, W] back to 0..255
        patch = F.avg_pool2d(red[:, None], 4)[:, 0]  # [B, h/4, w/4]
        gid = ((patch - 3) / 5).round().long().flatten(1)  # [B, N]
        g = self.group_emb.shape[0]
        soft = F.one_hot(gid, g).float().transpose(1, 2)  # [B, G, N]
        ident = torch.eye(g).expand(b, g, g)  # a second stage that keeps the groups
        maps = [GroupingMaps(soft, soft), GroupingMaps(ident, ident)]
        emb = self.image_emb.expand(b, -1)
        return ImageGroups(
            embedding=emb,
            group_features=self.group_emb.expand(b, -1, -1),
            maps=maps,
            grid=(h // 4, w // 4),
            group_embeddings=self.group_emb.expand(b, -1, -1),
        )


def test_slide_equals_whole_translation_consistent_model():
    bh, bw = 6, 8  # 6 x 8 blocks of 8 x 8 pixels, each its own group
    ids = np.arange(bh * bw).reshape(bh, bw)
    red = np.kron(5 * ids + 3, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)  # [48, 64]
    img = np.stack([red, np.zeros_like(red), np.zeros_like(red)], axis=-1)
    model = BlockModel(groups=bh * bw)
    text = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    cfg = SegConfig(crop=32, stride=16, short_side=None, bg_thresh=0.5, topk=3, batch_size=4)
    slide = ZeroShotSegmenter(model, list("abcde"), cfg, text_embeddings=text).predict_scores(img)
    whole = ZeroShotSegmenter(model, list("abcde"), cfg.replace(mode="whole"), text_embeddings=text).predict_scores(img)
    torch.testing.assert_close(slide, whole, rtol=1e-6, atol=1e-7)
    # and the scores are the block's own: the window placement and averaging are right
    probs = group_class_probs(model.group_emb[None], model.image_emb[None], text, clamped_scale(model.logit_scale), 3)[
        0
    ]
    want_fg = probs[torch.from_numpy(ids).long()].permute(2, 0, 1).repeat_interleave(8, 1).repeat_interleave(8, 2)
    torch.testing.assert_close(slide[1:], want_fg, rtol=1e-6, atol=1e-7)
    assert 0 < slide[0].mean() < 1  # some blocks background, some not


# ---- the segmenter end to end -----------------------------------------------------------------------------------


def test_batched_equals_single(tiny):
    imgs = [_image(40, 56, 1), _image(48, 48, 2), _image(37, 71, 3)]
    names = ["cat", "dog", "person"]
    cfg = SegConfig(**SMALL, batch_size=16)
    batched = ZeroShotSegmenter(tiny, names, cfg).predict_scores_batch(imgs)
    single = ZeroShotSegmenter(tiny, names, cfg.replace(batch_size=1))
    for img, s in zip(imgs, batched):
        torch.testing.assert_close(s, single.predict_scores(img), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(37, 91), (91, 37), (20, 27), (48, 48)])
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_any_size_and_aspect(tiny, hw, mode):
    seg = ZeroShotSegmenter(tiny, ["cat", "dog"], SegConfig(**SMALL, mode=mode, bg_thresh=0.0))
    lab = seg.predict(_image(*hw, 7))
    assert lab.shape == hw and lab.dtype == np.int32
    assert lab.min() >= 0 and lab.max() <= 2
    assert seg.labels == ["background", "cat", "dog"]
    seg = ZeroShotSegmenter(tiny, ["cat", "dog"], SegConfig(crop=32, stride=16, short_side=None, mode=mode))
    assert seg.predict(_image(*hw, 7)).shape == hw  # no resize: windows smaller than the crop


def test_no_background_labels(tiny):
    seg = ZeroShotSegmenter(tiny, ["a", "b", "c"], SegConfig(**SMALL, background=False))
    assert seg.labels == ["a", "b", "c"]
    img = _image(40, 40, 4)
    s = seg.predict_scores(img)
    assert s.shape == (3, 40, 40)
    with_bg = ZeroShotSegmenter(tiny, ["a", "b", "c"], SegConfig(**SMALL)).predict_scores(img)
    torch.testing.assert_close(s, with_bg[1:])  # same foreground channels, no background channel
    assert set(np.unique(seg.predict(img))) <= {0, 1, 2}


def test_bfloat16_model(tiny):
    img = _image(40, 48, 13)
    names = ["cat", "dog", "person"]
    cfg = SegConfig(**SMALL, bg_thresh=0.0)
    want = ZeroShotSegmenter(tiny, names, cfg).predict_scores(img)
    half = groupvit.create_model("groupvit-tiny")
    half.load_state_dict(tiny.state_dict())
    got = ZeroShotSegmenter(half.to(torch.bfloat16), names, cfg).predict_scores(img)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.argmax(0) == want.argmax(0)).float().mean() > 0.9  # bf16 may flip a few group argmaxes


def test_input_checks(tiny):
    with pytest.raises(ValueError, match="non-empty"):
        ZeroShotSegmenter(tiny, [], SegConfig(**SMALL))
    with pytest.raises(ValueError, match="more than once"):
        ZeroShotSegmenter(tiny, ["cat", "cat"], SegConfig(**SMALL))
    with pytest.raises(ValueError, match="background"):
        ZeroShotSegmenter(tiny, ["background", "cat"], SegConfig(**SMALL))
    with pytest.raises(TypeError):
        ZeroShotSegmenter(tiny, "cat", SegConfig(**SMALL))
    with pytest.raises(ValueError, match="stride"):
        SegConfig(crop=32, stride=33)
    with pytest.raises(ValueError, match="mode"):
        SegConfig(mode="sliding")
    with pytest.raises(ValueError, match=r"\{\}"):
        SegConfig(templates=("a photo",))
    seg = ZeroShotSegmenter(tiny, ["cat"], SegConfig(crop=32, stride=16, short_side=None))
    with pytest.raises(ValueError, match="smaller than one"):
        seg.predict(_image(3, 30, 0))
    with pytest.raises(TypeError, match="uint8"):
        seg.predict(np.zeros((8, 8, 3), np.float32))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("bg_thresh", float("nan"), "bg_thresh"),
        ("bg_thresh", -1.0, "bg_thresh"),
        ("bg_thresh", 2.0, "bg_thresh"),
        ("bg_thresh", True, "bg_thresh"),
        ("topk", 2.5, "whole number"),
        ("crop", 448.7, "whole number"),
        ("stride", 16.0, "whole number"),
        ("short_side", 100.5, "whole number"),
        ("batch_size", True, "whole number"),
    ],
)
def test_seg_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SegConfig(**{field: value})
    assert SegConfig(bg_thresh=0.0).bg_thresh == 0.0 and SegConfig(bg_thresh=1).bg_thresh == 1  # the range's ends
    assert SegConfig(crop=np.int64(32), stride=16).crop == 32 and SegConfig(short_side=None).short_side is None


def test_checkpoint_formats_give_same_segmentation(tiny, tmp_path):
    img = _image(40, 52, 11)
    names = ["cat", "dog", "person"]
    cfg = SegConfig(**SMALL, bg_thresh=0.0)
    want = ZeroShotSegmenter(tiny, names, cfg).predict_scores(img)
    groupvit.save_model(tiny, tmp_path / "ours.pt")
    torch.save(groupvit.export_hf(tiny), tmp_path / "hf.pt")
    torch.save({"model": tiny.state_dict()}, tmp_path / "official_like.pt")
    for path in ("ours.pt", "hf.pt", "official_like.pt"):
        model = groupvit.load_checkpoint(tmp_path / path, groupvit.create_model("groupvit-tiny"))
        got = ZeroShotSegmenter(model, names, cfg).predict_scores(img)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=path)


@pytest.mark.interpreter  # the CPU model through the kernels
@pytest.mark.skipif(importlib.util.find_spec("kernels.assign_attention") is None, reason="triton kernel not present")
def test_triton_backend_matches_eager(tiny):
    img = _image(40, 40, 12)
    cfg = SegConfig(**SMALL, bg_thresh=0.0, batch_size=16)
    seg = ZeroShotSegmenter(tiny, ["cat", "dog", "person"], cfg)
    with ops.use_backend("eager"):
        want = seg.predict_scores(img)
    with ops.use_backend("triton"):
        got = seg.predict_scores(img)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
