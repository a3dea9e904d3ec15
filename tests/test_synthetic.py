"""Synthetic coloured-shapes dataset: determinism, caption/mask/image consistency, shards, idempotence."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.data import build_train_loader
from train.synthetic import COLORS, SHAPES, class_names, generate, load_val, remap_mask, write_synthetic_shards

_OBJ = re.compile(r"\ban? (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")


def _caption_objects(caption: str) -> list[tuple[str, str]]:
    return _OBJ.findall(caption)


def _same(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x[0]), np.asarray(y[0])) and x[1] == y[1] and np.array_equal(x[2], y[2])
        for x, y in zip(a, b)
    ) and len(a) == len(b)


def test_deterministic_given_seed():
    a, b = generate(20, seed=5, size=48), generate(20, seed=5, size=48)
    assert _same(a, b)
    c = generate(20, seed=6, size=48)
    assert sum(x[1] != y[1] for x, y in zip(a, c)) > 10
    assert _same(generate(5, seed=5, size=48, start=10), a[10:15])  # sample i depends only on (seed, i)
    v = generate(20, seed=5, size=48, split="val")
    assert sum(x[1] != y[1] for x, y in zip(a, v)) > 10  # val is a different stream


@pytest.mark.parametrize("size", [32, 64, 97])
def test_masks_consistent_with_captions(size):
    names_color, names_shape, names_obj = class_names("color"), class_names("shape"), class_names("object")
    n_objects = []
    for img, cap, obj in generate(60, seed=1, size=size, kind="object"):
        arr = np.asarray(img).astype(np.float64)
        assert img.size == (size, size) and img.mode == "RGB" and obj.shape == (size, size) and obj.dtype == np.uint8
        objs = _caption_objects(cap)
        n_objects.append(len(objs))
        assert 1 <= len(objs) <= 3 and len({c for c, _ in objs}) == len(objs), cap  # distinct colours
        present = {names_obj[v] for v in np.unique(obj) if v}
        assert present == {f"{c} {s}" for c, s in objs}, cap  # every captioned object, nothing else
        for c, s in objs:
            pix = obj == names_obj.index(f"{c} {s}")
            assert pix.sum() >= 0.005 * size * size, (cap, c, s)
            # the image shows that colour there (jitter ±14 plus pixel noise)
            assert np.abs(arr[pix].mean(0) - np.array(COLORS[c])).max() < 25, (cap, c)
        # the background is grey-ish: low saturation compared with any object colour
        bg = arr[obj == 0]
        assert (bg.max(1) - bg.min(1)).mean() < 45
        col = remap_mask(obj, "color")
        assert {names_color[v] for v in np.unique(col) if v} == {c for c, _ in objs}
        shp = remap_mask(obj, "shape")
        assert {names_shape[v] for v in np.unique(shp) if v} == {s for _, s in objs}
        assert np.array_equal(col > 0, obj > 0) and np.array_equal(shp > 0, obj > 0)
    assert set(n_objects) == {1, 2, 3}


def test_generate_kind_matches_remap():
    obj = generate(8, seed=2, size=40, kind="object")
    for kind in ("color", "shape"):
        assert _same(generate(8, seed=2, size=40, kind=kind), [(i, c, remap_mask(m, kind)) for i, c, m in obj])


def test_shapes_are_distinguishable():
    """Shapes differ in fill ratio of their box: circle ~0.785, square 1, triangle ~0.5, cross ~0.6 (independent)."""
    fill = {s: [] for s in SHAPES}
    for _, cap, obj in generate(80, seed=3, size=96, kind="object"):
        for v in np.unique(obj):
            if v == 0:
                continue
            ys, xs = np.nonzero(obj == v)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill[class_names("object")[v].split(" ")[1]].append(len(ys) / box)
    med = {s: float(np.median(f)) for s, f in fill.items()}
    assert med["square"] > 0.95 and 0.72 < med["circle"] < 0.85 and 0.4 < med["triangle"] < 0.6
    assert 0.45 < med["cross"] < 0.7 and abs(med["cross"] - med["triangle"]) > 0.03


def test_class_names():
    assert class_names() == ["background", "red", "green", "blue", "yellow", "purple", "orange"]
    assert class_names("shape") == ["background", "circle", "square", "triangle", "cross"]
    assert len(class_names("object")) == 1 + 6 * 4 and class_names("object")[1] == "red circle"
    with pytest.raises(ValueError, match="kind"):
        class_names("texture")
    with pytest.raises(ValueError, match="remap_mask"):
        remap_mask(np.full((2, 2), 25, np.uint8))
    with pytest.raises(ValueError, match="size"):
        generate(1, 0, 8)


def test_shards_round_trip_and_idempotent(tmp_path):
    out = tmp_path / "syn"
    res = write_synthetic_shards(out, n_train=30, n_val=10, seed=4, size=32, shard_size=8)
    assert len(res.train) == 4 and len(res.val) == 2 and res.n_train == 30
    assert res.train_pattern.endswith("train-{000000..000003}.tar")
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["params"]["n_train"] == 30 and len(meta["train"]) == 4

    # held-out set: identical to the generator (png images are lossless)
    val = load_val(res, kind="color")
    assert _same(val, generate(10, seed=4, size=32, split="val", kind="color"))
    assert _same(load_val(str(out), kind="object"), generate(10, seed=4, size=32, split="val", kind="object"))

    # train shards read by the training loader: all 30 samples, captions intact
    loader = build_train_loader(res.train_pattern, batch_size=1, img_size=32, augment=False, shuffle_buffer=0)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == [f"train{i:08d}" for i in range(30)] and loader.stats.skipped == 0

    # idempotent: same parameters → nothing rewritten
    mtimes = {p: Path(p).stat().st_mtime_ns for p in res.train + res.val}
    again = write_synthetic_shards(out, n_train=30, n_val=10, seed=4, size=32, shard_size=8)
    assert again == res and all(Path(p).stat().st_mtime_ns == t for p, t in mtimes.items())

    # other parameters → regenerated, stale shards removed
    new = write_synthetic_shards(out, n_train=12, n_val=3, seed=4, size=32, shard_size=8)
    assert len(new.train) == 2 and len(new.val) == 1
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    # a missing shard also triggers regeneration
    Path(new.train[1]).unlink()
    assert Path(write_synthetic_shards(out, n_train=12, n_val=3, seed=4, size=32, shard_size=8).train[1]).is_file()


def test_train_images_decode_close_to_generator(tmp_path):
    import io
    import tarfile

    res = write_synthetic_shards(tmp_path, n_train=6, n_val=0, seed=9, size=48, shard_size=100)
    with tarfile.open(res.train[0]) as tf:
        data = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    for i, (img, cap, _) in enumerate(generate(6, seed=9, size=48)):
        assert data[f"train{i:08d}.txt"].decode() == cap
        dec = np.asarray(Image.open(io.BytesIO(data[f"train{i:08d}.jpg"])).convert("RGB")).astype(float)
        ref = np.asarray(img).astype(float)
        blocks = lambda a: a.reshape(12, 4, 12, 4, 3).mean((1, 3))  # noqa: E731 - JPEG keeps low frequencies
        assert np.abs(blocks(dec) - blocks(ref)).mean() < 3 and np.abs(dec - ref).mean() < 12


def test_load_val_names_an_incomplete_shard(tmp_path):
    """A held-out shard whose sample lacks a member (e.g. half-written) is reported with the shard, key and fix."""
    import tarfile

    res = write_synthetic_shards(tmp_path / "syn", n_train=0, n_val=3, seed=1, size=32, shard_size=8)
    src = Path(res.val[0])
    with tarfile.open(src) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin.getmembers()]
    dropped = next(m.name for m, _ in members if m.name.endswith(".txt"))
    with tarfile.open(src, "w") as tout:
        for m, data in members:
            if m.name != dropped:
                tout.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"val-000000\.tar.*lacks \['txt'\].*regenerate"):
        load_val(res)


def test_train_shards_carry_the_objects_as_prompt_words(tmp_path):
    """The multi-label prompts' words are the objects' "colour shape" phrases, in caption order, and the loader
    takes them (no tagging): each is the object of one colour in the mask, named in the caption."""
    import webdataset as wds

    from train.prompts import make_prompts, parse_nouns

    res = write_synthetic_shards(tmp_path, n_train=12, n_val=0, seed=3, size=32, shard_size=100)
    ref = generate(12, seed=3, size=32, kind="object")
    samples = list(wds.tariterators.tarfile_samples({"url": p} for p in res.train))
    assert [s["__key__"] for s in samples] == [f"train{i:08d}" for i in range(12)]
    for s, (_, cap, obj) in zip(samples, ref):
        caption = s["txt"].decode("utf-8")
        words = parse_nouns(s["nouns"], caption)
        assert caption == cap and words, caption
        present = {class_names("object")[v] for v in np.unique(obj) if v}
        assert set(words) == present and len(words) == len(present)
        assert sorted(words, key=caption.index) == words  # caption order
        prompts = make_prompts(caption, 3, random.Random(0), words=words)
        assert all(any(w in p for w in words) for p in prompts[: len(words)])


def test_object_free_images_every_nth(tmp_path):
    """``empty_every=n``: training samples n-1, 2n-1, ... are a background alone captioned "a grey background" with no
    prompt words; every other sample and the held-out split are exactly those of ``empty_every=0``."""
    base = generate(12, seed=2, size=32)
    mixed = generate(12, seed=2, size=32, empty_every=4)
    for i, (b, m) in enumerate(zip(base, mixed)):
        if i % 4 == 3:
            img = np.asarray(m[0], np.float32)
            assert m[1] == "a grey background" and not m[2].any()
            assert np.abs(img - img.mean(2, keepdims=True)).max() < 60  # grey (low saturation), no coloured object
            assert not _same([b], [m])
        else:
            assert _same([b], [m]), i
    assert _same(generate(6, seed=2, size=32, split="val", empty_every=4), generate(6, seed=2, size=32, split="val"))
    with pytest.raises(ValueError, match="empty_every"):
        generate(2, empty_every=-1)
    res = write_synthetic_shards(tmp_path, n_train=8, n_val=2, seed=2, size=32, shard_size=8, empty_every=4)
    assert json.loads((tmp_path / "manifest.json").read_text())["params"]["empty_every"] == 4
    with tarfile.open(res.train[0]) as tar:
        caps = {m.name[: -len(".txt")]: tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")}
        words = json.loads(tar.extractfile("train00000003.nouns").read())["words"]
    assert caps["train00000003"] == caps["train00000007"] == "a grey background" and len(caps) == 8
    assert words == [] and caps["train00000002"] == base[2][1]
