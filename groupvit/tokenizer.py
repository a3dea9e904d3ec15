"""OpenAI CLIP byte-level BPE tokenizer (the one GroupViT's text encoder was trained with).

Own implementation of the published algorithm (OpenAI CLIP, MIT); the vocabulary file
``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's (see ``assets/LICENSE-CLIP.txt``).

Pipeline for one text (docs/groupvit.md §5):

1. clean: ``ftfy.fix_text`` → ``html.unescape`` twice → strip → collapse whitespace → lower-case;
2. split into words with CLIP's regex (contractions, letter runs, single digits, punctuation runs);
3. map each word's UTF-8 bytes to printable unicode symbols, mark the last symbol with ``</w>`` and apply the BPE
   merges in rank order (lowest rank first, all occurrences left to right) until none applies;
4. ``[SOT=49406] + ids + [EOT=49407]``, zero-padded to ``context_length``; a longer sequence is cut to
   ``context_length`` and its last token forced to EOT (so the text encoder's argmax-pooling still finds an EOT).

As in OpenAI CLIP, the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` inside a text are mapped to the special
ids. Per-word BPE results are cached (captions reuse a small vocabulary of words), and texts that are printable ASCII
without ``&`` skip ``ftfy`` (which leaves such text unchanged) because it dominates the cost.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

__all__ = [
    "SOT_TOKEN",
    "EOT_TOKEN",
    "VOCAB_SIZE",
    "CONTEXT_LENGTH",
    "DEFAULT_VOCAB",
    "ClipTokenizer",
    "clean_text",
    "get_tokenizer",
    "tokenize",
]

SOT_TOKEN = 49406
EOT_TOKEN = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
DEFAULT_VOCAB = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merges: vocab = 256 bytes + 256 bytes</w> + merges + 2 specials
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_CACHE_LIMIT = 500_000  # words; the cache is cleared when it grows past this (bounded memory on web-scale text)


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """Byte value → printable unicode symbol (printable Latin-1 bytes map to themselves, the rest to U+0100+)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _byte_symbol_order() -> list[str]:
    """The 256 byte symbols in vocabulary order (the kept printable bytes first, then the remapped ones)."""
    sym = _byte_symbols()
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    rest = [b for b in range(256) if b not in set(keep)]
    return [sym[b] for b in keep + rest]


def _is_plain_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable() and "&" not in text


def clean_text(text: str) -> str:
    """CLIP text cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    if not _is_plain_ascii(text):  # ftfy is the identity on printable ASCII without '&' (checked in the tests)
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP BPE tokenizer. ``tok(texts, context_length=77) -> LongTensor [N, L]``.

    Args:
        vocab_path: gzipped merges file (default: the bundled ``bpe_simple_vocab_16e6.txt.gz``).
    """

    def __init__(self, vocab_path: str | Path = DEFAULT_VOCAB):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(ln.split()) for ln in lines[1 : _N_MERGES + 1]]  # line 0 is a "#version" header
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"ClipTokenizer: {vocab_path} is not a CLIP merges file ({len(merges)} merges read)")
        byte_syms = _byte_symbol_order()
        vocab = byte_syms + [s + "</w>" for s in byte_syms] + [a + b for a, b in merges] + list(_SPECIALS)
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: s for s, i in self.encoder.items()}
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self._byte_sym = _byte_symbols()
        self._byte_of = {s: b for b, s in enumerate(self._byte_sym)}
        self._cache: dict[str, list[int]] = {s: [self.encoder[s]] for s in _SPECIALS}
        assert self.encoder[_SPECIALS[0]] == SOT_TOKEN and self.encoder[_SPECIALS[1]] == EOT_TOKEN
        assert len(self.encoder) == VOCAB_SIZE

    # -- BPE -------------------------------------------------------------------------------------------------------
    def _bpe(self, word: str) -> list[int]:
        """Token ids of one regex word (bytes → symbols → greedy lowest-rank merges), cached."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        syms = [self._byte_sym[b] for b in word.encode("utf-8")]
        parts = syms[:-1] + [syms[-1] + "</w>"]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, _N_MERGES
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair, _N_MERGES)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(parts)
            while i < n:
                if i + 1 < n and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {s: [self.encoder[s]] for s in _SPECIALS}
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"ClipTokenizer.encode: expected str, got {type(text).__name__}")
        out: list[int] = []
        for word in _WORD_RE.findall(clean_text(text)):
            out.extend(self._bpe(word))
        return out

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Inverse of :meth:`encode` up to cleaning (drops padding 0s after EOT; for debugging and logs)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytearray()
        for i in ids:
            if i in (0, SOT_TOKEN, EOT_TOKEN):
                continue
            sym = self.decoder[i]
            end = sym.endswith("</w>")
            data.extend(self._byte_of[c] for c in (sym[:-4] if end else sym))
            if end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """Tokenize to ``LongTensor [N, context_length]``: SOT + BPE + EOT, zero padded, truncated with EOT last."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"tokenize: expected str or list[str], got {type(texts).__name__}")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                f"tokenize: context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}"
            )
        rows = []
        for text in texts:
            ids = [SOT_TOKEN] + self.encode(text) + [EOT_TOKEN]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = EOT_TOKEN
            rows.append(ids + [0] * (context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(texts), context_length)  # [N, L], one tensor built


@lru_cache(maxsize=1)
def get_tokenizer() -> ClipTokenizer:
    """Process-wide tokenizer with the bundled vocabulary (built once, ~0.3 s)."""
    return ClipTokenizer()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP-tokenize ``texts`` → ``LongTensor [N, context_length]`` (see :class:`ClipTokenizer`)."""
    return get_tokenizer()(texts, context_length=context_length)
