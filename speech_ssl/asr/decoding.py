"""CTC decoding: greedy (best path) and lexicon-constrained beam search with an optional KenLM model.

Token ids follow the vocabulary convention of ``speech_ssl.data.Vocabulary``: 0 is the CTC blank
(``<pad>``), ``|`` is the word boundary. Both decoders are callables ``(logits [B, T, V], lengths [B])
-> list[str]`` (one transcript per row, words separated by single spaces).

Beam search is torchaudio's flashlight-text CTC decoder. With a lexicon it can only produce words of
the lexicon: that is what makes it better than greedy on a closed vocabulary, and why the default
lexicon is every word of the training transcripts (``lexicon_words.json`` beside a fine-tuned
checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from speech_ssl.errors import SpeechSSLError

log = logging.getLogger(__name__)

BLANK = 0


@dataclass
class BeamConfig:
    """Lexicon beam search (torchaudio's flashlight CTC decoder).

    beam_size: hypotheses kept after each frame. beam_threshold: prune hypotheses scoring this far below
        the best one.
    lexicon: a lexicon file (``word<TAB>c h a r s |`` a line), or null to build one from the checkpoint's
        training transcripts (``lexicon_words.json``).
    kenlm: optional KenLM model (binary or ARPA). lm_weight: the language model's weight (only with kenlm).
    word_score: a bonus (or penalty, negative) added per emitted word.
    """

    beam_size: int = 50
    lexicon: Optional[str] = None
    kenlm: Optional[str] = None
    lm_weight: float = 2.0
    word_score: float = 0.0
    beam_threshold: float = 25.0


def greedy_decode(logits: torch.Tensor, lengths: Optional[torch.Tensor] = None, blank: int = BLANK) -> list[list[int]]:
    """Best-path decoding: argmax per frame, collapse repeats, drop blanks. logits [B, T, V] -> ids per row."""
    best = logits.argmax(dim=-1).cpu()
    out = []
    for i, row in enumerate(best):
        if lengths is not None:
            row = row[: int(lengths[i])]
        ids = torch.unique_consecutive(row)
        out.append([int(t) for t in ids if int(t) != blank])
    return out


class GreedyDecoder:
    """Best path, then the vocabulary's spelling (``Vocabulary.decode``: ``|`` -> space, ``<unk>`` and the other
    special tokens written out), exactly as an exported transformers processor decodes the same logits."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, logits: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> list[str]:
        return [self.vocab.decode(ids) for ids in greedy_decode(logits, lengths, self.vocab.blank_id)]


def write_lexicon(words: Iterable[str], path: Path, tokens: Optional[Sequence[str]] = None,
                  word_boundary: str = "|") -> Path:
    """A flashlight lexicon: each word spelled in characters, then the word boundary token.

    With ``tokens``, words that use a character outside them are left out (with a warning): the
    decoder could never spell them.
    """
    unique = sorted({w for w in words if w and not any(ch.isspace() for ch in w)})
    if tokens is not None:
        known = set(tokens)
        spellable = [w for w in unique if set(w) <= known]
        if len(spellable) < len(unique):
            dropped = sorted(set(unique) - set(spellable))
            log.warning("lexicon: %d words use characters outside the vocabulary and are left out (e.g. %s)",
                        len(dropped), ", ".join(dropped[:5]))
        unique = spellable
    if not unique:
        raise SpeechSSLError("the lexicon for beam search is empty: no word can be spelled with the vocabulary")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for word in unique:
            f.write(f"{word}\t{' '.join(word)} {word_boundary}\n")
    return path


class BeamSearchDecoder:
    """torchaudio's flashlight CTC beam search over a lexicon (and a KenLM model when given).

    tokens: the vocabulary's tokens in id order. Words outside the lexicon cannot be produced.
    """

    def __init__(self, tokens: Sequence[str], lexicon: Path, kenlm: Optional[str] = None, beam_size: int = 50,
                 lm_weight: float = 2.0, word_score: float = 0.0, beam_threshold: float = 25.0,
                 blank_token: str = "<pad>", word_boundary: str = "|", unk_word: str = "<unk>"):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except ImportError as err:  # pragma: no cover - flashlight-text is in the decode extra
            raise SpeechSSLError("beam search needs flashlight-text: pip install 'speech-ssl[decode]'") from err
        self.boundary_id = list(tokens).index(word_boundary)
        if kenlm is not None and not Path(kenlm).is_file():
            raise SpeechSSLError(f"beam.kenlm: no KenLM model at {kenlm}")
        try:
            self.decoder = ctc_decoder(
                lexicon=str(lexicon), tokens=list(tokens), lm=kenlm, beam_size=beam_size,
                beam_threshold=beam_threshold, lm_weight=lm_weight if kenlm else 0.0, word_score=word_score,
                blank_token=blank_token, sil_token=word_boundary, unk_word=unk_word, nbest=1,
            )
        except (RuntimeError, ValueError) as err:
            raise SpeechSSLError(f"cannot build the beam-search decoder (lexicon {lexicon}"
                                 f"{', KenLM ' + kenlm if kenlm else ''}): {err}") from None

    def __call__(self, logits: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> list[str]:
        emissions = torch.log_softmax(logits.float(), dim=-1).cpu()
        batch, frames, _ = emissions.shape
        lengths = torch.full((batch,), frames) if lengths is None else lengths.cpu().long()
        # The lexicon spells every word with a closing word boundary, but our targets (like transformers')
        # have no boundary after the last word, so a model never emits one there and the decoder would
        # drop the last word. One extra frame that is certainly a boundary closes it (fairseq's letter
        # targets end with "|" for the same reason).
        closed = torch.cat([emissions, emissions.new_zeros(batch, 1, emissions.shape[2])], dim=1)
        boundary = torch.full((emissions.shape[2],), -1e4)
        boundary[self.boundary_id] = 0.0
        closed[torch.arange(batch), lengths] = boundary
        results = self.decoder(closed.contiguous(), (lengths + 1).int())
        return [" ".join(w for w in hyp[0].words if w).strip() if hyp else "" for hyp in results]


def build_decoder(kind: str, vocab, beam: Optional[BeamConfig] = None, lexicon_words: Optional[Iterable[str]] = None,
                  workdir: Optional[Path] = None):
    """``greedy`` or ``beam``; beam search uses ``beam.lexicon`` or else a lexicon of ``lexicon_words``
    written under ``workdir`` (a temporary directory the caller keeps alive)."""
    if kind == "greedy":
        return GreedyDecoder(vocab)
    if kind != "beam":
        raise SpeechSSLError(f"unknown decoder {kind!r}; expected greedy or beam")
    beam = beam or BeamConfig()
    if beam.lexicon:
        lexicon = Path(beam.lexicon)
        if not lexicon.is_file():
            raise SpeechSSLError(f"beam.lexicon: no lexicon file at {beam.lexicon}")
    else:
        if lexicon_words is None:
            raise SpeechSSLError("beam search needs a lexicon: this checkpoint has no lexicon_words.json (the words "
                                 "of its training transcripts); give one with beam.lexicon=<file>")
        if workdir is None:
            raise ValueError("build_decoder needs a workdir to write the lexicon into")
        lexicon = write_lexicon(lexicon_words, Path(workdir) / "lexicon.txt", vocab.tokens)
    return BeamSearchDecoder(vocab.tokens, lexicon, kenlm=beam.kenlm, beam_size=beam.beam_size,
                             lm_weight=beam.lm_weight, word_score=beam.word_score,
                             beam_threshold=beam.beam_threshold, blank_token=vocab.tokens[vocab.blank_id])
