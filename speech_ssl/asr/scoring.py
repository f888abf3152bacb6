"""Word and character error rates, with jiwer, as additive counts (so batches and workers can be summed).

WER = word_errors / words and CER = char_errors / chars over any union of utterances, which is what
jiwer computes over a whole corpus (``jiwer.wer(refs, hyps)``): the sum of every utterance's edit
operations divided by the sum of the reference lengths. Characters include the spaces between words
(jiwer's CER).
"""

from __future__ import annotations

from typing import Sequence

import jiwer

COUNT_KEYS = ("word_errors", "words", "char_errors", "chars")


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Edit counts of ``hypotheses`` against ``references``: word_errors/words and char_errors/chars.

    Empty references are counted in ``empty_refs`` and left out (an error rate against nothing is
    undefined); ``utterances`` is the number scored.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip()]
    counts = {"word_errors": 0.0, "words": 0.0, "char_errors": 0.0, "chars": 0.0, "utterances": float(len(pairs)),
              "empty_refs": float(len(references) - len(pairs))}
    if not pairs:
        return counts
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    counts["word_errors"] = float(words.substitutions + words.deletions + words.insertions)
    counts["words"] = float(words.substitutions + words.deletions + words.hits)
    counts["char_errors"] = float(chars.substitutions + chars.deletions + chars.insertions)
    counts["chars"] = float(chars.substitutions + chars.deletions + chars.hits)
    return counts


def utterance_errors(reference: str, hypothesis: str) -> dict[str, int] | None:
    """One utterance's counts as integers (``None`` for an empty reference, which is not scored)."""
    counts = error_counts([reference], [hypothesis])
    if counts["utterances"] == 0:
        return None
    return {k: int(counts[k]) for k in COUNT_KEYS}


def rates(counts: dict[str, float]) -> dict[str, float]:
    """``wer`` and ``cer`` (fractions, not percent) from summed ``error_counts``."""
    return {"wer": counts["word_errors"] / max(counts["words"], 1.0),
            "cer": counts["char_errors"] / max(counts["chars"], 1.0)}
