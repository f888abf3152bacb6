"""Speech recognition pieces without training: WER/CER against jiwer, greedy and lexicon beam-search
decoding (with a KenLM model). The export round trip through transformers is in test_export.py."""

from __future__ import annotations

import dataclasses
import json
import math

import jiwer
import pytest
import torch

from audio_factory import write_arpa
from speech_ssl.asr.decoding import BeamConfig, BeamSearchDecoder, GreedyDecoder, build_decoder, greedy_decode, write_lexicon
from speech_ssl.asr.scoring import error_counts, rates, utterance_errors
from speech_ssl.data import TextConfig, Vocabulary
from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import build, build_ctc, save_model

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------------------------------
# WER / CER


KNOWN = [
    # reference, hypothesis, word errors, char errors (jiwer's CER counts the spaces too)
    ("THE CAT SAT", "THE CAT SAT", 0, 0),
    ("THE CAT SAT", "THE BAT SAT", 1, 1),
    ("THE CAT SAT", "THE CAT SAT ON", 1, 3),
    ("THE CAT SAT", "", 3, 11),
    ("A B", "A B C D", 2, 4),
]


def test_error_counts_agree_with_jiwer_on_known_strings():
    refs = [r for r, _, _, _ in KNOWN]
    hyps = [h for _, h, _, _ in KNOWN]
    counts = error_counts(refs, hyps)
    assert counts["word_errors"] == sum(w for _, _, w, _ in KNOWN)
    assert counts["char_errors"] == sum(c for _, _, _, c in KNOWN)
    assert counts["words"] == sum(len(r.split()) for r in refs)
    assert counts["chars"] == sum(len(r) for r in refs)
    r = rates(counts)
    assert r["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert r["cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
    # Per-utterance counts add up to the corpus counts (so batches and workers can be summed).
    per = [utterance_errors(ref, hyp) for ref, hyp in zip(refs, hyps)]
    for key in ("word_errors", "words", "char_errors", "chars"):
        assert sum(p[key] for p in per) == counts[key]
    assert [p["word_errors"] for p in per] == [w for _, _, w, _ in KNOWN]


def test_empty_references_are_counted_and_left_out():
    counts = error_counts(["", "A B", "   "], ["X", "A C", ""])
    assert counts["empty_refs"] == 2 and counts["utterances"] == 1
    assert rates(counts)["wer"] == pytest.approx(0.5)
    assert utterance_errors("", "ANYTHING") is None
    with pytest.raises(ValueError):
        error_counts(["A"], [])


# ---------------------------------------------------------------------------------------------------
# decoding

VOCAB = Vocabulary.build(["ABCD"])  # <pad> <s> </s> <unk> | A B C D


def emissions(frames: list[dict[str, float]], vocab: Vocabulary = VOCAB) -> torch.Tensor:
    """[1, T, V] logits: each frame puts the given probabilities on tokens ('-' = blank), the rest on blank."""
    rows = []
    for frame in frames:
        p = torch.full((len(vocab),), 1e-4)
        rest = 1.0 - sum(frame.values())
        for token, prob in frame.items():
            p[vocab.index["<pad>" if token == "-" else token]] = prob
        p[vocab.blank_id] += max(rest, 0.0)
        rows.append(torch.log(p / p.sum()))
    return torch.stack(rows)[None]


def spell(text: str, ambiguous: dict[int, dict[str, float]] | None = None) -> list[dict[str, float]]:
    """Frames spelling ``text`` (``|`` between words), a blank after every symbol; ``ambiguous[i]``
    replaces the frame of the i-th symbol."""
    frames = []
    for i, ch in enumerate(text.replace(" ", "|")):
        frames.append((ambiguous or {}).get(i, {ch: 0.9}))
        frames.append({"-": 0.9})
    return frames


def test_greedy_collapses_repeats_and_drops_blanks():
    logits = emissions([{"A": 0.9}, {"A": 0.9}, {"-": 0.9}, {"A": 0.9}, {"B": 0.9}, {"|": 0.9}, {"C": 0.9}])
    assert greedy_decode(logits) == [[VOCAB.index[t] for t in "AAB|C"]]
    assert GreedyDecoder(VOCAB)(logits) == ["AAB C"]
    # lengths cut each row
    assert GreedyDecoder(VOCAB)(logits, torch.tensor([2])) == ["A"]


def test_lexicon_beam_search_corrects_what_greedy_misspells(tmp_path):
    # The 2nd word's last letter leans to B (0.55) over D (0.40): greedy says "DAB", a word the lexicon lacks.
    text = "CAB DAD"
    frames = spell(text, {6: {"B": 0.55, "D": 0.40}})
    logits = emissions(frames)
    assert GreedyDecoder(VOCAB)(logits) == ["CAB DAB"]
    lexicon = write_lexicon(["CAB", "DAD", "BAD", "DAD"], tmp_path / "lexicon.txt", VOCAB.tokens)
    assert lexicon.read_text().splitlines() == ["BAD\tB A D |", "CAB\tC A B |", "DAD\tD A D |"]
    beam = BeamSearchDecoder(VOCAB.tokens, lexicon, beam_size=20)
    assert beam(logits) == ["CAB DAD"]
    # lengths are honoured: only the first word's frames
    assert beam(logits, torch.tensor([8])) == ["CAB"]


def test_kenlm_model_steers_the_beam(tmp_path):
    # The 2nd word's first letter leans to D (0.50) over B (0.45): without an LM "DAD"; a unigram LM that
    # finds BAD far likelier than DAD turns it into "BAD".
    frames = spell("CAB DAD", {4: {"D": 0.50, "B": 0.45}})
    logits = emissions(frames)
    arpa = write_arpa(tmp_path / "lm.arpa", {"CAB": -0.5, "BAD": -0.5, "DAD": -3.0})
    words = ["CAB", "DAD", "BAD"]
    plain = build_decoder("beam", VOCAB, BeamConfig(beam_size=20), words, tmp_path / "plain")
    assert plain(logits) == ["CAB DAD"]
    with_lm = build_decoder("beam", VOCAB, BeamConfig(beam_size=20, kenlm=str(arpa), lm_weight=1.0), words,
                            tmp_path / "lm")
    assert with_lm(logits) == ["CAB BAD"]


def test_beam_search_without_a_lexicon_is_a_clear_error(tmp_path):
    with pytest.raises(SpeechSSLError, match="beam.lexicon"):
        build_decoder("beam", VOCAB, BeamConfig(), None, tmp_path)
    with pytest.raises(SpeechSSLError, match="no lexicon file"):
        build_decoder("beam", VOCAB, BeamConfig(lexicon=str(tmp_path / "nope.txt")), None, tmp_path)
    with pytest.raises(SpeechSSLError, match="KenLM"):
        build_decoder("beam", VOCAB, BeamConfig(kenlm=str(tmp_path / "nope.arpa")), ["AB"], tmp_path)
    with pytest.raises(SpeechSSLError, match="empty"):
        write_lexicon(["XYZ"], tmp_path / "l.txt", VOCAB.tokens)  # no word is spellable


def _ctc_checkpoint(tmp_path):
    vocab = Vocabulary.build(["ABC DEF GH"])
    torch.manual_seed(0)
    model = build_ctc("tiny", len(vocab)).eval()
    ckpt = tmp_path / "ctc"
    save_model(model, ckpt, vocab=vocab.index)
    (ckpt / "text_config.json").write_text(json.dumps(dataclasses.asdict(TextConfig())))
    (ckpt / "lexicon_words.json").write_text(json.dumps(["ABC", "DEF"]))
    return model, vocab, ckpt


def test_a_pretraining_checkpoint_is_no_recogniser(tmp_path):
    from speech_ssl.asr.recognizer import Recognizer

    save_model(build("tiny"), tmp_path / "pre")
    with pytest.raises(SpeechSSLError, match="not a fine-tuned CTC model"):
        Recognizer.load(tmp_path / "pre")
    _, vocab, ckpt = _ctc_checkpoint(tmp_path)
    (ckpt / "vocab.json").unlink()
    with pytest.raises(SpeechSSLError, match="no vocab.json"):
        Recognizer.load(ckpt)


def test_rates_are_fractions():
    r = rates(error_counts(["A B C D"], ["A B"]))
    assert r["wer"] == 0.5 and 0 < r["cer"] < 1 and not math.isnan(r["cer"])
