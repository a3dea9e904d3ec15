"""CLIP BPE tokenizer: spec example, equality with open_clip's SimpleTokenizer (independent oracle), edge cases."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import string
import sys
import types

import ftfy
import pytest
import torch

from groupvit.tokenizer import DEFAULT_VOCAB, EOT_TOKEN, SOT_TOKEN, ClipTokenizer, clean_text, get_tokenizer, tokenize


@pytest.fixture(scope="module")
def oracle():
    """open_clip's SimpleTokenizer, loaded without running open_clip/__init__ (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed (dev dependency; used only as an independent oracle)")
    before = set(sys.modules)
    saved = sys.modules.get("open_clip")
    if saved is None:
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["open_clip"] = pkg
    try:
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer()
    finally:
        for name in set(sys.modules) - before:  # leave no stub behind for other test modules
            del sys.modules[name]
    return tok


def _captions() -> list[str]:
    """~200 varied captions: real ones, generated ones, unicode, HTML entities, mojibake, odd whitespace."""
    real = [
        "a page of text about segmentation",
        "a facial photo of a tabby cat",
        "a portrait of an astronaut with the American flag",
        "a rocket standing on a launchpad",
        "a red motorcycle standing in a garage",
        "a person looking at a camera on a tripod",
        "a black-and-white silhouette of a horse",
        "a cup of coffee on a saucer",
        "A man riding a wave on top of a surfboard.",
        "a photo of a cat.",
    ]
    special = [
        "",
        " ",
        "\t\n ",
        ".",
        "!!!???",
        "Tom &amp; Jerry",
        "5 &lt; 6 &amp;amp; 7 &gt; 3",
        "caf&eacute; au lait",
        "&quot;quoted&quot; text",
        "Ã©tÃ© â€” mojibake",
        "naïve café résumé",
        "Straße in München",
        "東京タワーの夜景",
        "고양이 사진",
        "Москва зимой",
        "emoji 🐱🚀 party 🎉",
        "ＦＵＬＬＷＩＤＴＨ text",
        "ligature ﬁne ﬂow",
        "tabs\tand\nnewlines\r\nhere",
        "   leading and trailing   ",
        "MiXeD CaSe WoRdS",
        "it's they're we've I'm you'll he'd",
        "numbers 1234567890 and 3.14159",
        "pi ≈ 3.14, e ≈ 2.72",
        "url: https://example.com/a_b-c?d=1",
        "#hashtag @mention $100 50% off",
        "“curly quotes” and ‘single’",
        "em—dash and en–dash",
        "a\u200bzero\u200bwidth",
        "non\u00a0breaking\u00a0space",
        "x" * 300,
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "<b>bold</b> <i>html</i> tags",
        "C++ & C# programming",
        "snake_case and camelCase and kebab-case",
        "Ω≈ç√∫˜µ≤≥÷",
        "a photo of a cat " * 30,
    ]
    rng = random.Random(1234)
    words = (
        "dog cat car tree house person man woman child bird boat plane train bus bicycle horse sheep cow "
        "bottle chair table sofa plant monitor red green blue yellow big small old young running sitting "
        "standing flying on in under near beside with of the a an two three several beautiful sunset beach "
        "mountain river city street night snow rain"
    ).split()
    punct = [".", ",", "!", "?", ";", ":", "-", "'s", "(", ")", '"', "&"]
    gen = []
    for _ in range(200 - len(real) - len(special)):
        n = rng.randint(1, 25)
        toks = [rng.choice(words) for _ in range(n)]
        for _ in range(rng.randint(0, 3)):
            toks.insert(rng.randint(0, len(toks)), rng.choice(punct))
        s = " ".join(toks)
        if rng.random() < 0.3:
            s = s.capitalize()
        if rng.random() < 0.2:
            s = s.upper()
        if rng.random() < 0.2:
            s += " " + str(rng.randint(0, 10**6))
        gen.append(s)
    return real + special + gen


def test_bundled_vocab_md5():
    assert hashlib.md5(DEFAULT_VOCAB.read_bytes()).hexdigest() == "933b7abbbbde62c36f02f0e6ccde464f"
    assert (DEFAULT_VOCAB.parent / "LICENSE-CLIP.txt").is_file()


def test_spec_example():
    out = tokenize("a photo of a cat.")
    assert out.shape == (1, 77) and out.dtype == torch.long
    assert out[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert out[0, 8:].eq(0).all()


def test_matches_open_clip_oracle(oracle):
    caps = _captions()
    assert len(caps) >= 200
    for L in (77, 16):
        ours = tokenize(caps, context_length=L)
        ref = oracle(caps, context_length=L)
        assert ours.shape == ref.shape == (len(caps), L)
        bad = [c for c, a, b in zip(caps, ours, ref) if not torch.equal(a, b)]
        assert not bad, f"{len(bad)} captions differ, e.g. {bad[:3]!r}"


def test_encode_matches_oracle_per_word(oracle):
    tok = get_tokenizer()
    for cap in _captions()[:60]:
        assert tok.encode(cap) == oracle.encode(cap), cap


def test_truncation_forces_eot():
    long = "dog " * 100
    for L in (77, 10, 2):
        out = tokenize(long, context_length=L)[0]
        assert out.shape == (L,)
        assert out[0].item() == SOT_TOKEN and out[-1].item() == EOT_TOKEN
        assert (out[1:-1] != EOT_TOKEN).all() and (out != 0).all()
    # exactly fitting: SOT + 75 words + EOT = 77, no truncation needed
    out = tokenize("dog " * 75)[0]
    assert out[-1].item() == EOT_TOKEN and out[-2].item() != EOT_TOKEN


def test_empty_and_batch_padding():
    out = tokenize(["", "a cat", "   "], context_length=8)
    assert out.tolist()[0] == [SOT_TOKEN, EOT_TOKEN, 0, 0, 0, 0, 0, 0]
    assert out.tolist()[2] == [SOT_TOKEN, EOT_TOKEN, 0, 0, 0, 0, 0, 0]
    assert out[1, 0].item() == SOT_TOKEN and out[1, 3].item() == EOT_TOKEN and out[1, 4:].eq(0).all()
    assert tokenize([], context_length=5).shape == (0, 5)


def test_unicode_and_html_cleaning():
    assert clean_text("Tom &amp;amp; Jerry") == "tom & jerry"  # unescaped twice
    assert clean_text("  A\tB\n\nC  ") == "a b c"
    assert clean_text("Ã©tÃ©") == "été"  # ftfy mojibake repair
    assert torch.equal(tokenize("Tom &amp; Jerry"), tokenize("tom & jerry"))
    assert torch.equal(tokenize("NAÏVE  Café"), tokenize("naïve café"))
    tok = get_tokenizer()
    assert tok.decode(tokenize("naïve café 東京 🐱")[0]) == "naïve café 東京 🐱"


def test_ascii_fast_path_equals_ftfy():
    """clean_text skips ftfy for printable ASCII without '&': check ftfy really is the identity there."""
    rng = random.Random(7)
    alphabet = [c for c in string.printable if c.isprintable() and c != "&"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50)))
        assert ftfy.fix_text(s) == s, repr(s)


def test_bad_inputs():
    with pytest.raises(TypeError, match="tokenize"):
        tokenize(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokenize"):
        tokenize(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)


def test_bad_vocab_file(tmp_path):
    import gzip

    p = tmp_path / "v.txt.gz"
    with gzip.open(p, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="merges"):
        ClipTokenizer(p)
