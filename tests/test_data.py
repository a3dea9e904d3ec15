"""webdataset training pipeline: round trip, mixing, bad data, shapes, rank split, determinism and resume."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from groupvit.tokenizer import EOT_TOKEN, SOT_TOKEN, get_tokenizer, tokenize
from train.data import DataStats, _local_tar_samples, build_train_loader, expand_urls, write_shards
from train.transforms import IMAGENET_MEAN, IMAGENET_STD

NLTK_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nltk_data"
S = 16  # image side used throughout: with augment=False and img_size=S the transform is only normalisation


def _arr(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).integers(0, 256, (S, S, 3), dtype=np.uint8)


def _caption(prefix: str, i: int) -> str:
    return f"a photo number {i} of set {prefix} with a dog"


def _norm(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(arr.astype(np.float64) / 255).permute(2, 0, 1)
    m = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    return ((x - m) / s).float()


def _samples(prefix: str, n: int, offset: int = 0):
    for i in range(offset, offset + n):
        yield f"{prefix}{i:05d}", Image.fromarray(_arr(i)), _caption(prefix, i)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    a = write_shards(_samples("a", 21), root / "a", "seta", maxcount=7, image_format="png")  # 3 shards
    b = write_shards(_samples("b", 10, 100), root / "b", "setb", maxcount=5, image_format="png")  # 2 shards
    assert len(a) == 3 and len(b) == 2
    return {
        "a": str(root / "a" / "seta-{000000..000002}.tar"),
        "b": str(root / "b" / "setb-{000000..000001}.tar"),
        "root": str(root),
    }


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


def _loader(urls, **kw):
    args = dict(batch_size=1, img_size=S, augment=False, shuffle_buffer=0, seed=0)
    args.update(kw)
    return build_train_loader(urls, **args)


def test_round_trip(shards):
    tok = get_tokenizer()
    seen = {}
    for batch in _loader(shards["a"], batch_size=3, context_length=20):
        assert batch["images"].shape == (3, 3, S, S) and batch["texts"].shape == (3, 1, 20)
        for key, img, ids in zip(batch["keys"], batch["images"], batch["texts"]):
            seen[key] = (img, ids[0])
    assert sorted(seen) == [f"a{i:05d}" for i in range(21)]
    for key, (img, ids) in seen.items():
        i = int(key[1:])
        assert torch.allclose(img, _norm(_arr(i)), atol=1e-5), key
        assert tok.decode(ids).replace(" ", "") == _caption("a", i).replace(" ", "")  # digits decode spaced
        assert torch.equal(ids, tokenize(_caption("a", i), context_length=20)[0])


def test_mixing_two_sets(shards):
    keys = _keys(_loader([shards["a"], shards["b"]], shuffle_buffer=50))
    assert sorted(keys) == sorted([f"a{i:05d}" for i in range(21)] + [f"b{i:05d}" for i in range(100, 110)])
    # the buffer shuffle really interleaves the two sets (not a's then b's)
    first = [k[0] for k in keys[:15]]
    assert "a" in first and "b" in first
    n = sum(len(b["keys"]) for b in _loader([shards["a"], shards["b"]], batch_size=4))
    assert n == 28  # 31 samples → 7 full batches, no partial batch


def test_batch_shapes_and_dtypes(shards):
    batch = next(iter(_loader(shards["b"], batch_size=4, augment=True, img_size=12)))
    assert batch["images"].shape == (4, 3, 12, 12) and batch["images"].dtype == torch.float32
    assert batch["texts"].shape == (4, 1, 77) and batch["texts"].dtype == torch.int64
    keys = batch["keys"]
    assert isinstance(keys, list) and len(keys) == 4 and all(isinstance(k, str) for k in keys)


def test_multi_label_texts(shards, monkeypatch):
    if not (NLTK_DIR / "taggers" / "averaged_perceptron_tagger_eng").is_dir():
        pytest.skip(f"NLTK tagger data not found at {NLTK_DIR}")
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DIR))
    tok = get_tokenizer()
    batch = next(iter(_loader(shards["a"], batch_size=5, multi_label=3, context_length=32)))
    t = batch["texts"]
    assert t.shape == (5, 4, 32) and t.dtype == torch.int64
    assert (t[:, :, 0] == SOT_TOKEN).all() and ((t == EOT_TOKEN).sum(-1) == 1).all()
    for key, rows in zip(batch["keys"], t):
        cap = _caption("a", int(key[1:]))
        assert tok.decode(rows[0]).replace(" ", "") == cap.replace(" ", "")
        prompts = [tok.decode(r) for r in rows[1:]]
        assert all(p.replace(" ", "") != cap.replace(" ", "") for p in prompts)  # >= 3 nouns: no padding
        assert all(any(w in p for w in ("photo", "number", "set", "dog")) for p in prompts)


def _truncated_copy(src: str, dst: Path, member_index: int) -> int:
    """Copy tar ``src`` cut 10 bytes into the data of member ``member_index``; returns that member's sample index."""
    with tarfile.open(src) as tf:
        members = tf.getmembers()
    cut = members[member_index].offset_data + 10
    dst.write_bytes(Path(src).read_bytes()[:cut])
    return member_index // 2


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bad")
    good_png = io.BytesIO()
    Image.fromarray(_arr(0)).save(good_png, format="PNG")
    samples = list(_samples("g", 6)) + [
        ("corruptjpg", b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10, "a broken jpeg"),
        ("halfpng", good_png.getvalue()[: len(good_png.getvalue()) // 2], "a truncated png"),
        ("emptycap", Image.fromarray(_arr(1)), "  \n "),
        ("nocap", Image.fromarray(_arr(2)), None),
        ("noimg", None, "a caption without image"),
    ]
    write_shards(samples, root, "bad", maxcount=100, image_format="png")  # bad-000000.tar
    full = write_shards(_samples("t", 5, 50), root / "tmp", "t", maxcount=100, image_format="png")
    n_ok = _truncated_copy(full[0], root / "bad-000001.tar", member_index=4)  # cut inside sample 2's png
    assert n_ok == 2
    return str(root / "bad-{000000..000002}.tar")  # bad-000002.tar does not exist


@pytest.mark.parametrize("num_workers, augment_on", [(0, "cpu"), (2, "cpu"), (0, "gpu")])
def test_bad_data_skipped_and_counted(bad_shards, num_workers, augment_on):
    loader = _loader(bad_shards, num_workers=num_workers, augment_on=augment_on)
    keys = _keys(loader)
    assert sorted(keys) == [f"g{i:05d}" for i in range(6)] + ["t00050", "t00051"]
    st = loader.stats
    assert isinstance(st, DataStats)
    assert (st.corrupt_images, st.empty_captions, st.missing_captions, st.missing_images) == (2, 1, 1, 1)
    assert st.shard_errors == 2  # the truncated shard and the missing one, each counted once
    assert st.samples == 11 + 2 and st.used == 8 and st.batches == 8 and st.skipped == 5
    assert loader.stats.as_dict()["skipped"] == 5


def test_rank_split_disjoint(shards):
    for urls, nw in ((shards["a"], 0), (shards["a"], 1), (shards["b"], 2)):  # shard split; sample split (4 > 2)
        per_rank = [_keys(_loader(urls, rank=r, world_size=2, num_workers=nw)) for r in range(2)]
        every = _keys(_loader(urls))
        assert set(per_rank[0]).isdisjoint(per_rank[1]), (urls, nw)
        assert sorted(per_rank[0] + per_rank[1]) == sorted(every)
        assert len(per_rank[0]) > 0 and len(per_rank[1]) > 0


def _batches(loader, epoch, start=0):
    return [(b["keys"], b["images"], b["texts"]) for b in loader.iter_epoch(epoch, start)]


def _same(x, y) -> bool:
    return len(x) == len(y) and all(
        a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(x, y)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_and_determinism_epoch_len(shards, num_workers):
    kw = dict(batch_size=3, num_workers=num_workers, augment=True, img_size=12, shuffle_buffer=8, epoch_len=7, seed=3)
    urls = [shards["a"], shards["b"]]
    loader = build_train_loader(urls, **kw)
    assert len(loader) == 7
    full = _batches(loader, 1)
    assert len(full) == 7 and loader.epoch == 2  # epoch advanced after a completed pass
    again = _batches(build_train_loader(urls, **kw), 1)
    assert _same(full, again)
    for start in (1, 4, 7):
        resumed = _batches(build_train_loader(urls, **kw), 1, start)
        assert _same(resumed, full[start:]), start
    other = _batches(loader, 2)
    assert [b[0] for b in other] != [b[0] for b in full]  # a new epoch reshuffles
    # 7 batches x 3 > 31 samples: the stream repeats across shard cycles without partial batches
    assert all(len(b[0]) == 3 for b in full)


def test_resume_one_pass(shards):
    kw = dict(batch_size=2, num_workers=2, augment=True, img_size=12, shuffle_buffer=6, seed=1)
    full = _batches(build_train_loader(shards["a"], **kw), 0)
    resumed = _batches(build_train_loader(shards["a"], **kw), 0, 3)
    assert len(full) >= 8 and _same(resumed, full[3:])
    augment_differs = _batches(build_train_loader(shards["a"], **{**kw, "seed": 2}), 0)
    assert not _same(full, augment_differs)


def test_write_shards_details(tmp_path):
    paths = write_shards(_samples("w", 7), tmp_path / "x", "p", maxcount=3)
    assert [Path(p).name for p in paths] == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]
    again = write_shards(_samples("w", 7), tmp_path / "y", "p", maxcount=3)
    assert all(Path(p).read_bytes() == Path(q).read_bytes() for p, q in zip(paths, again))  # reproducible bytes
    with tarfile.open(paths[0]) as tf:
        assert tf.getnames() == ["w00000.jpg", "w00000.txt", "w00001.jpg", "w00001.txt", "w00002.jpg", "w00002.txt"]
    with pytest.raises(ValueError, match="key"):
        write_shards([("a.b", None, "x")], tmp_path / "z", "p")
    with pytest.raises(TypeError, match="image"):
        write_shards([("ab", np.zeros((2, 2, 3)), "x")], tmp_path / "z", "p")


def test_bad_arguments(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard"):
        build_train_loader(str(tmp_path / "none-{000..003}.tar"), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        build_train_loader(shards["a"], batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        build_train_loader(shards["a"], batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="epoch_len"):
        build_train_loader(shards["a"], batch_size=2, epoch_len=0)
    with pytest.raises(ValueError, match="no shard pattern"):
        expand_urls([])
    with pytest.raises(TypeError, match="epoch_len"):
        len(build_train_loader(shards["a"], batch_size=2))


# ---- image decoding: high bit depth, pixel cap, messages, globs ---------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_png_scaled_to_8_bits_in_training(tmp_path):
    grey16 = np.random.default_rng(7).integers(0, 65536, (S, S), dtype=np.uint16)
    urls = write_shards([("deep", _png(Image.fromarray(grey16)), "a 16-bit grey photo")], tmp_path, "d16")
    with tarfile.open(urls[0]) as tf:
        assert Image.open(tf.extractfile("deep.png")).mode == "I;16"
    (batch,) = list(_loader(urls))
    want = np.repeat(np.round(grey16 / 257.0).astype(np.uint8)[..., None], 3, axis=2)  # 65535 -> 255 by value
    torch.testing.assert_close(batch["images"][0], _norm(want), rtol=0, atol=1e-5)


def test_pixel_cap_skips_and_counts_decompression_bombs(tmp_path, caplog):
    bomb = _png(Image.new("L", (3000, 3000)))  # ~9 M pixels in a few KB
    assert len(bomb) < 20_000
    urls = write_shards([("bomb", bomb, "a huge image"), *_samples("ok", 2)], tmp_path, "bomb")
    loader = _loader(urls, max_pixels=1_000_000)
    with caplog.at_level("WARNING", logger="train.data"):
        assert _keys(loader) == ["ok00000", "ok00001"]
    assert loader.stats.oversized_images == 1 and loader.stats.skipped == 1
    assert "bomb" in caplog.text and "above the cap of 1,000,000 pixels" in caplog.text
    assert _keys(_loader(urls, max_pixels=None)) == ["bomb", "ok00000", "ok00001"]


def test_corrupt_jpeg_logged_with_shard_and_key(bad_shards, caplog):
    with caplog.at_level("WARNING", logger="train.data"):
        _keys(_loader(bad_shards))
    line = next(r.getMessage() for r in caplog.records if "corruptjpg" in r.getMessage())
    assert "bad-000000.tar" in line and "sample corruptjpg" in line and "BytesIO" not in line, line


def test_shard_globs(shards):
    root = shards["root"]
    assert expand_urls(f"{root}/a/*.tar") == [f"{root}/a/seta-00000{i}.tar" for i in range(3)]
    assert expand_urls([f"{root}/{{a,b}}/set?-000000.tar"]) == [
        f"{root}/a/seta-000000.tar",
        f"{root}/b/setb-000000.tar",
    ]
    assert sorted(_keys(_loader(f"{root}/*/*.tar"))) == sorted(_keys(_loader([shards["a"], shards["b"]])))
    with pytest.raises(FileNotFoundError, match=r"globbed, e.g. 'dir/\*.tar'"):
        expand_urls(f"{root}/nothing-*.tar")


def test_cli_names_a_shard_pattern_that_matches_nothing(tmp_path, capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--preset", "demo", f"data.train_shards=['{tmp_path}/shards-*.tar']", f"output_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "data.train_shards: build_train_loader: no shard of pattern" in err and "globbed" in err


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_local_tar_reader_groups_as_webdataset(tmp_path, fmt):
    """The loader's own reader of local shards gives webdataset's samples (webdataset is the oracle): long names
    (pax / GNU / ustar prefix), dotted folders, upper-case extensions, folders, links and __meta__ members."""
    import webdataset as wds

    deep = "d" * 60 + "/" + "e" * 70  # > 100 characters: a pax or GNU long name, or a ustar prefix
    members = [
        ("__info__/x.json", b"{}"),
        ("a.b/k1.jpg", b"\xff\xd8" * 300),
        ("a.b/k1.TXT", b"one"),
        (f"{deep}/k2.png", b"png" * 1000),
        (f"{deep}/k2.txt", b"two"),
        ("k3.nouns.json", b"[]"),
        ("k3.txt", b""),
        ("noext", b"x"),
    ]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("folder.dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k3.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "k3.txt"
        tf.addfile(link)
    want = list(wds.tariterators.tarfile_samples([{"url": str(path)}]))
    got = list(_local_tar_samples(str(path)))
    assert got == want and [g["__key__"] for g in got] == ["a.b/k1", f"{deep}/k2", "k3"]
    assert set(got[0]) == {"__key__", "__url__", "jpg", "txt"} and got[2]["nouns.json"] == b"[]"
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(_local_tar_samples(str(empty)))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(tarfile.ReadError, match="bad tar header at byte 0"):
        list(_local_tar_samples(str(bad)))
    bad.write_bytes(path.read_bytes()[:1500])  # cut in the second member's padding
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(_local_tar_samples(str(bad)))
    data = bytearray(path.read_bytes())
    data[512] ^= 1  # the second header's name: its checksum no longer matches
    bad.write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError, match="bad tar header at byte 512"):
        list(_local_tar_samples(str(bad)))
