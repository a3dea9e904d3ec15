"""Multi-label noun prompts for GroupViT's multi-label contrastive loss (spec §9, "Text transforms").

For each caption, every time it is loaded:

1. word-tokenize (``nltk.word_tokenize(text, preserve_line=True)``: needs no punkt data) and POS-tag it with
   NLTK's averaged-perceptron tagger;
2. keep words tagged NN, NNS, NNP, VB, VBD, VBG, VBN, VBP, VBZ (verbs included, NNPS excluded), de-duplicated in
   caption order;
3. choose ``min(K, n)`` of them uniformly without replacement, each filled into a template drawn uniformly from the
   80 CLIP ImageNet templates;
4. pad to K prompts with the raw caption.

The tagger reads ``taggers/averaged_perceptron_tagger_eng/`` (three JSON files) from the NLTK data path; point
``NLTK_DATA`` at the folder that contains ``taggers/``. All randomness comes from a caller-supplied
:class:`random.Random`, so the data loader can make prompts reproducible per sample.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from typing import Any

__all__ = ["IMAGENET_TEMPLATES", "KEEP_TAGS", "candidate_words", "load_tagger", "make_prompts"]

KEEP_TAGS = frozenset({"NN", "NNS", "NNP", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ"})

# The 80 prompt templates of OpenAI CLIP's ImageNet zero-shot evaluation ("full" set; CLIP repository, MIT).
IMAGENET_TEMPLATES: list[str] = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]
assert len(IMAGENET_TEMPLATES) == 80

_TAGGER_DIR = "taggers/averaged_perceptron_tagger_eng"


@lru_cache(maxsize=1)
def load_tagger() -> Any:
    """The NLTK averaged-perceptron tagger, loaded once per process (``nltk.pos_tag`` would reload it per call).

    Raises:
        LookupError: with setup instructions when the tagger files are not on the NLTK data path.
    """
    import nltk.data
    from nltk.tag.perceptron import PerceptronTagger

    env = os.environ.get("NLTK_DATA")
    if env:  # NLTK reads NLTK_DATA once at import time; honour a value set later too
        for p in reversed(env.split(os.pathsep)):
            if p and p not in nltk.data.path:
                nltk.data.path.insert(0, p)
    try:
        return PerceptronTagger()
    except (LookupError, OSError, ValueError) as exn:
        raise LookupError(
            f"multi-label prompts need NLTK's averaged-perceptron POS tagger ({_TAGGER_DIR}/ with its three "
            f".json files), which was not found on the NLTK data path {list(nltk.data.path)}. Set the environment "
            f"variable NLTK_DATA to the folder that contains 'taggers/' (in this project's CI layout: "
            f"NLTK_DATA=../shared/data/nltk_data), or use multi_label=0. Original error: {exn}"
        ) from None


def candidate_words(caption: str) -> list[str]:
    """Distinct words of ``caption`` tagged as a noun (NN, NNS, NNP) or verb (VB*), in caption order."""
    if not isinstance(caption, str):
        raise TypeError(f"candidate_words: caption must be str, got {type(caption).__name__}")
    from nltk.tokenize import word_tokenize

    tagged = load_tagger().tag(word_tokenize(caption, preserve_line=True))
    return list(dict.fromkeys(word for word, tag in tagged if tag in KEEP_TAGS))


def make_prompts(caption: str, k: int, rng: random.Random) -> list[str]:
    """K prompts for ``caption``: ``min(k, n)`` distinct candidate words in random templates, padded with the caption.

    Args:
        caption: the raw caption.
        k: number of prompts (GroupViT uses 3); ``k = 0`` gives ``[]``.
        rng: source of all randomness (word choice, then one template per word).
    Returns:
        ``list[str]`` of length ``k``.
    """
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"make_prompts: k must be an int >= 0, got {k!r}")
    if not isinstance(rng, random.Random):
        raise TypeError(f"make_prompts: rng must be a random.Random, got {type(rng).__name__}")
    if k == 0:
        return []
    words = candidate_words(caption)
    chosen = rng.sample(words, min(k, len(words)))
    prompts = [rng.choice(IMAGENET_TEMPLATES).format(w) for w in chosen]
    return prompts + [caption] * (k - len(prompts))
