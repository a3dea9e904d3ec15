"""Multi-label noun prompts: tagger-based word choice, templates, padding, determinism, missing-tagger error."""

from __future__ import annotations

import importlib.util
import random
import sys
import types
from pathlib import Path

import pytest

from train import prompts
from train.prompts import IMAGENET_TEMPLATES, candidate_words, load_tagger, make_prompts

NLTK_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nltk_data"


@pytest.fixture(autouse=True)
def nltk_data(monkeypatch):
    if not (NLTK_DIR / "taggers" / "averaged_perceptron_tagger_eng").is_dir():
        pytest.skip(f"NLTK tagger data not found at {NLTK_DIR} (only present in the project's CI layout)")
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DIR))
    return NLTK_DIR


SURF = "A man riding a wave on top of a surfboard."


def test_candidate_words_spec_example():
    assert candidate_words(SURF) == ["man", "riding", "wave", "top", "surfboard"]
    assert candidate_words("the the of and") == []
    assert candidate_words("dog chases dog") == ["dog", "chases"]  # distinct


def test_templates_match_clip_list():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed (independent oracle for the template list)")
    before = set(sys.modules)
    if "open_clip" not in sys.modules:
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["open_clip"] = pkg
    try:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        ref = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
    assert IMAGENET_TEMPLATES == ref


def _word_of(prompt: str) -> str:
    """The filled-in word; the most specific (longest) matching template wins ("a photo of a weird {}.")."""
    best = None
    for t in IMAGENET_TEMPLATES:
        pre, post = t.split("{}")
        if prompt.startswith(pre) and prompt.endswith(post) and len(prompt) > len(pre) + len(post):
            if best is None or len(t) > len(best[0]):
                best = (t, prompt[len(pre) : len(prompt) - len(post)])
    assert best is not None, f"not a template prompt: {prompt!r}"
    return best[1]


def test_make_prompts_k3():
    rng = random.Random(0)
    seen: set[str] = set()
    for _ in range(200):
        out = make_prompts(SURF, 3, rng)
        assert len(out) == 3
        words = [_word_of(p) for p in out]
        assert len(set(words)) == 3 and set(words) <= {"man", "riding", "wave", "top", "surfboard"}
        seen |= set(words)
    assert seen == {"man", "riding", "wave", "top", "surfboard"}  # all five get chosen sometimes


def test_padding_with_caption():
    rng = random.Random(1)
    cap = "a purple square"  # tagger: purple/NN square/NN -> 2 words
    out = make_prompts(cap, 4, rng)
    assert len(out) == 4 and out[2:] == [cap, cap]
    assert {_word_of(p) for p in out[:2]} == {"purple", "square"}
    assert make_prompts("of the and", 3, rng) == ["of the and"] * 3
    assert make_prompts(SURF, 0, rng) == []
    assert make_prompts("", 2, rng) == ["", ""]


def test_deterministic_with_seed():
    a = [make_prompts(SURF, 3, random.Random(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    outs = {tuple(make_prompts(SURF, 3, random.Random(s))) for s in range(20)}
    assert len(outs) > 10  # different seeds give different prompts
    # template choice is uniform over the 80 templates: every template shows up in 2000 draws
    rng = random.Random(3)
    used = {make_prompts("a dog", 1, rng)[0].replace("dog", "{}") for _ in range(2000)}  # "dog" is in no template
    assert used == set(IMAGENET_TEMPLATES)


def test_bad_args():
    with pytest.raises(ValueError, match="make_prompts"):
        make_prompts(SURF, -1, random.Random(0))
    with pytest.raises(TypeError, match="make_prompts"):
        make_prompts(SURF, 3, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="candidate_words"):
        candidate_words(None)  # type: ignore[arg-type]


def test_missing_tagger_error(monkeypatch, tmp_path):
    import nltk.data

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    load_tagger.cache_clear()
    try:
        with pytest.raises(LookupError, match="NLTK_DATA") as e:
            make_prompts(SURF, 3, random.Random(0))
        assert "data.multi_label=0" in str(e.value) and "python -m train.prompts download-tagger" in str(e.value)
    finally:
        load_tagger.cache_clear()
    assert prompts.load_tagger is load_tagger


# ---- precomputed nouns in the shards ----------------------------------------------------------------------------
CAPTIONS = [SURF, "Two dogs play with a red ball in the park.", "the the of and", "A cat sleeps; the cat dreams."]


def _shards(root: Path):
    import numpy as np
    from PIL import Image

    from train.data import write_shards

    img = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    samples = [(f"c{i:02d}", img, CAPTIONS[i % 4]) for i in range(10)] + [("nocap", img, None)]
    return write_shards(samples, root, "n", maxcount=4, image_format="png")  # 3 shards


def _texts(urls):
    from train.data import build_train_loader

    loader = build_train_loader(
        urls, batch_size=2, img_size=8, augment=False, multi_label=3, shuffle_buffer=4, seed=2, num_workers=0
    )
    return [(b["keys"], b["texts"]) for b in loader]


def test_precomputed_nouns_give_the_same_prompts(tmp_path, capsys, monkeypatch):
    import tarfile

    plain = _shards(tmp_path / "plain")
    tagged = _shards(tmp_path / "tagged")
    assert prompts.main(["add-nouns", str(tmp_path / "tagged" / "n-*.tar"), "--workers", "2"]) == 0
    assert "10 samples tagged in 3 of 3 shards" in capsys.readouterr().out
    with tarfile.open(tagged[0]) as tf:
        names = tf.getnames()
        rec = tf.extractfile("c01.nouns").read()
    assert names[:3] == ["c00.png", "c00.txt", "c00.nouns"]
    assert prompts.parse_nouns(rec, CAPTIONS[1]) == candidate_words(CAPTIONS[1]) == ["dogs", "play", "ball", "park"]
    assert prompts.parse_nouns(rec, "another caption") is None  # stale: the loader tags on the fly instead
    with tarfile.open(tagged[2]) as tf:
        assert "nocap.nouns" not in tf.getnames()
    # the loader uses the stored words (tagging disabled proves it) and gets exactly the on-the-fly prompts
    want = _texts(plain)

    def no_tagging(caption):
        raise AssertionError(f"tagged on the fly: {caption!r}")

    monkeypatch.setattr(prompts, "candidate_words", no_tagging)
    got = _texts(tagged)
    monkeypatch.undo()
    assert len(got) == 5 and all(a[0] == b[0] and (a[1] == b[1]).all() for a, b in zip(got, want))
    # resumable: finished shards are left alone
    before = [Path(p).read_bytes() for p in tagged]
    assert prompts.add_nouns([str(tmp_path / "tagged" / "n-{000000..000002}.tar")]) == {
        "shards": 3,
        "rewritten": 0,
        "samples": 0,
    }
    assert [Path(p).read_bytes() for p in tagged] == before
    assert prompts.main(["add-nouns", str(tmp_path / "missing-*.tar")]) == 2
    assert "no shard of pattern" in capsys.readouterr().err
