"""CTC decoding: greedy (best path) and lexicon-constrained beam search with optional KenLM.

Token ids follow the vocabulary convention of ``speech_ssl.data.Vocabulary``: 0 is the CTC blank
(``<pad>``), ``|`` is the word boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

BLANK = 0


def greedy_decode(logits: torch.Tensor, lengths: Optional[torch.Tensor] = None, blank: int = BLANK) -> list[list[int]]:
    """Best-path decoding: argmax per frame, collapse repeats, drop blanks. logits [B, T, V]."""
    best = logits.argmax(dim=-1).cpu()
    out = []
    for i, row in enumerate(best):
        if lengths is not None:
            row = row[: int(lengths[i])]
        ids = torch.unique_consecutive(row)
        out.append([int(t) for t in ids if int(t) != blank])
    return out


def write_lexicon(words: Iterable[str], path: Path, word_boundary: str = "|") -> Path:
    """A flashlight lexicon: each word spelled in characters, then the word boundary token."""
    unique = sorted({w for w in words if w})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for word in unique:
            f.write(f"{word}\t{' '.join(word)} {word_boundary}\n")
    return path


class BeamSearchDecoder:
    """torchaudio's flashlight CTC beam search over a lexicon (and a KenLM model when given).

    tokens: the vocabulary's tokens in id order. Words outside the lexicon cannot be produced: that is
    the point of a lexicon (and why the lexicon is built from the training transcripts by default).
    """

    def __init__(self, tokens: Sequence[str], lexicon: Path, kenlm: Optional[str] = None, beam_size: int = 50,
                 lm_weight: float = 2.0, word_score: float = 0.0, beam_threshold: float = 25.0,
                 blank_token: str = "<pad>", word_boundary: str = "|", unk_word: str = "<unk>"):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except ImportError as err:  # pragma: no cover - flashlight-text is in the decode extra
            raise RuntimeError("beam search needs the 'decode' extra: pip install 'speech-ssl[decode]'") from err
        self.decoder = ctc_decoder(
            lexicon=str(lexicon), tokens=list(tokens), lm=kenlm, beam_size=beam_size, beam_threshold=beam_threshold,
            lm_weight=lm_weight if kenlm else 0.0, word_score=word_score, blank_token=blank_token,
            sil_token=word_boundary, unk_word=unk_word, nbest=1,
        )

    def __call__(self, logits: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> list[str]:
        emissions = torch.log_softmax(logits.float(), dim=-1).cpu().contiguous()
        results = self.decoder(emissions, lengths.cpu().int() if lengths is not None else None)
        return [" ".join(hyp[0].words).strip() if hyp else "" for hyp in results]
