"""The text side of CTC: an explicit transcript normaliser and a character vocabulary with a word boundary.

The vocabulary has the layout of transformers' ``Wav2Vec2CTCTokenizer``: ``<pad>`` (0, also the CTC
blank), ``<s>``, ``</s>``, ``<unk>``, ``|`` (word boundary), then the characters in sorted order. It is
saved as ``vocab.json`` ({token: id}) beside every fine-tuned checkpoint, so the same mapping is used at
evaluation time and a transformers tokenizer can read it.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from typing import Iterable, Optional, Sequence

from speech_ssl.data.config import TextConfig
from speech_ssl.errors import SpeechSSLError

PAD, BOS, EOS, UNK, WORD = "<pad>", "<s>", "</s>", "<unk>", "|"
SPECIALS = (PAD, BOS, EOS, UNK, WORD)
VOCAB_FILE = "vocab.json"


def _listing(counts: Counter, examples: dict[str, str]) -> str:
    shown = ", ".join(f"{ch!r} ({n}x, e.g. in {examples[ch]!r})" for ch, n in counts.most_common(20))
    more = f" and {len(counts) - 20} more" if len(counts) > 20 else ""
    return shown + more


class TextNormalizer:
    """``normalizer(text) -> text``: the configured, explicit transcript normalisation (see TextConfig).

    Letters, the space and ``cfg.keep`` survive; any other character is an error listing it (or is
    dropped with ``unknown=drop``). ``check(texts)`` raises one error listing every offending character
    of a whole corpus, before any training starts.
    """

    def __init__(self, cfg: Optional[TextConfig] = None):
        self.cfg = cfg or TextConfig()

    def _clean(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        for src, dst in self.cfg.char_map.items():
            text = text.replace(src, dst)
        if self.cfg.remove:
            text = text.translate({ord(c): None for c in self.cfg.remove})
        if self.cfg.uppercase:
            text = text.upper()
        return " ".join(text.split())

    def _allowed(self, ch: str) -> bool:
        return ch == " " or ch.isalpha() or ch in self.cfg.keep

    def __call__(self, text: str) -> str:
        text = self._clean(text)
        bad = [ch for ch in text if not self._allowed(ch)]
        if bad:
            if self.cfg.unknown == "drop":
                return " ".join("".join(ch for ch in text if self._allowed(ch)).split())
            raise SpeechSSLError(self._message(Counter(bad), {ch: text for ch in bad}))
        return text

    def _message(self, counts: Counter, examples: dict[str, str]) -> str:
        return (f"transcripts hold characters outside letters, space and keep={self.cfg.keep!r}: "
                f"{_listing(counts, examples)}. Map them with data.text.char_map, delete them with "
                "data.text.remove, keep them with data.text.keep, or drop them with data.text.unknown=drop.")

    def check(self, texts: Iterable[Optional[str]]) -> None:
        """Raise one SpeechSSLError naming every character of ``texts`` this normaliser would refuse."""
        if self.cfg.unknown == "drop":
            return
        counts: Counter = Counter()
        examples: dict[str, str] = {}
        for text in texts:
            if text is None:
                continue
            cleaned = self._clean(text)
            for ch in cleaned:
                if not self._allowed(ch):
                    counts[ch] += 1
                    examples.setdefault(ch, cleaned)
        if counts:
            raise SpeechSSLError(self._message(counts, examples))


class Vocabulary:
    """Characters <-> ids for CTC (transformers' Wav2Vec2CTCTokenizer layout; blank = ``<pad>`` = 0).

    ``unknown``: ``error`` (characters outside the vocabulary raise, listing them) or ``drop``.
    """

    def __init__(self, tokens: Sequence[str], unknown: str = "error"):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {tokens[:len(SPECIALS)]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("duplicate tokens in the vocabulary")
        if unknown not in ("error", "drop"):
            raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
        self.tokens = tokens
        self.unknown = unknown
        self.index = {t: i for i, t in enumerate(tokens)}

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, texts: Iterable[Optional[str]], normalizer: Optional[TextNormalizer] = None) -> "Vocabulary":
        """The characters of the normalised ``texts`` (sorted) after the special tokens."""
        normalizer = normalizer or TextNormalizer()
        chars = set()
        for text in texts:
            if text is not None:
                chars.update(normalizer(text))
        chars.discard(" ")
        chars.difference_update(SPECIALS)
        if not chars:
            raise SpeechSSLError("cannot build a vocabulary: the training manifest has no transcripts "
                                 "(a 'text' field on each line)")
        return cls(list(SPECIALS) + sorted(chars), unknown=normalizer.cfg.unknown)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/vocab.json`` ({token: id}, the transformers format)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.index, f, ensure_ascii=False, indent=1)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, unknown: str = "error") -> "Vocabulary":
        """Read ``vocab.json`` from ``directory`` (or the file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                mapping = json.load(f)
        except FileNotFoundError:
            raise SpeechSSLError(f"no vocabulary at {path}") from None
        tokens = [t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        if [mapping[t] for t in tokens] != list(range(len(tokens))):
            raise SpeechSSLError(f"{path}: ids must be 0..{len(tokens) - 1} without gaps")
        return cls(tokens, unknown=unknown)

    # -- use ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    @property
    def blank_id(self) -> int:
        return self.index[PAD]

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def word_delimiter_id(self) -> int:
        return self.index[WORD]

    def unknown_characters(self, texts: Iterable[Optional[str]]) -> Counter:
        counts: Counter = Counter()
        for text in texts:
            for ch in text or "":
                if ch != " " and ch not in self.index:
                    counts[ch] += 1
        return counts

    def check(self, texts: Sequence[Optional[str]]) -> None:
        """Raise one SpeechSSLError naming every character of the (normalised) ``texts`` not in the vocabulary."""
        if self.unknown == "drop":
            return
        counts = self.unknown_characters(texts)
        if counts:
            examples = {}
            for text in texts:
                for ch in text or "":
                    if ch in counts:
                        examples.setdefault(ch, text)
            raise SpeechSSLError(self._message(counts, examples))

    def _message(self, counts: Counter, examples: dict[str, str]) -> str:
        return (f"transcripts hold characters that are not in the vocabulary ({len(self)} tokens): "
                f"{_listing(counts, examples)}. Normalise them away (data.text.char_map / remove) or set "
                "data.text.unknown=drop.")

    def encode(self, text: str) -> list[int]:
        """Ids of a normalised transcript; spaces become the word boundary ``|``."""
        ids = []
        bad: Counter = Counter()
        for ch in " ".join(text.split()):
            token = WORD if ch == " " else ch
            if token in self.index and token not in (PAD, BOS, EOS, UNK):
                ids.append(self.index[token])
            else:
                bad[ch] += 1
        if bad and self.unknown == "error":
            raise SpeechSSLError(self._message(bad, {ch: text for ch in bad}))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (no CTC collapsing), spelled by transformers' Wav2Vec2CTCTokenizer rules so that an
        exported processor reads the same text out of the same logits: blanks (``<pad>``) dropped, ``|``
        becomes a space, every other token written as it is (``<unk>``, ``<s>``, ``</s>`` included: an
        untrained or confused model does emit them), the ends stripped. Two word boundaries with a blank
        between them stay two spaces, as in transformers."""
        tokens = (self.tokens[int(i)] for i in ids)
        return "".join(" " if token == WORD else token for token in tokens if token != PAD).strip()

    def decode_ctc(self, ids: Iterable[int]) -> str:
        """Greedy CTC: collapse repeats, drop blanks, then :meth:`decode` (transformers' ``batch_decode`` of
        the argmax ids gives the same text)."""
        collapsed = []
        previous = None
        for i in ids:
            i = int(i)
            if i != previous and i != self.blank_id:
                collapsed.append(i)
            previous = i
        return self.decode(collapsed)
