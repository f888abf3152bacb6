"""Generated audio for tests: signals, files in every supported format, and small corpora.

Tests never need data outside the repository: they build what they need here, in a tmp_path.

* ``tone``, ``chirp``, ``noise``: float32 signals.
* ``write_audio``: a file in wav / flac / ogg (vorbis) / opus / mp3, any rate and channel count.
* ``make_corpus``: a directory of varied utterances plus a JSONL manifest (the format of
  ``../shared/data/README.md``), optionally labeled.
* ``make_toy_asr_corpus``: a toy speech-recognition task a tiny CTC model can learn in a few hundred
  updates: each letter is a distinct tone pattern, words are separated by short silences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soundfile as sf

# file suffix -> (soundfile format, subtype)
FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
SUFFIX = {"wav": ".wav", "flac": ".flac", "ogg": ".ogg", "opus": ".opus", "mp3": ".mp3"}
# Rates each format's encoder accepts (Opus only a few).
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def tone(freq: float, seconds: float, rate: int = 16000, amplitude: float = 0.3, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def chirp(f0: float, f1: float, seconds: float, rate: int = 16000, amplitude: float = 0.3) -> np.ndarray:
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    k = (f1 - f0) / max(seconds, 1e-9)
    return (amplitude * np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))).astype(np.float32)


def noise(seconds: float, rate: int = 16000, amplitude: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amplitude * rng.standard_normal(int(round(seconds * rate)))).astype(np.float32)


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A varied signal (chirps, tones and noise bursts with an envelope): something to pretrain on."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(round(seconds * rate)), dtype=np.float32)
    pos = 0
    while pos < len(out):
        seg = rng.uniform(0.05, 0.25)
        kind = rng.integers(3)
        if kind == 0:
            piece = chirp(rng.uniform(100, 2000), rng.uniform(100, 4000), seg, rate)
        elif kind == 1:
            piece = tone(rng.uniform(80, 3000), seg, rate) + tone(rng.uniform(80, 3000), seg, rate, 0.1)
        else:
            piece = noise(seg, rate, 0.05, int(rng.integers(1 << 30)))
        piece = piece * np.hanning(len(piece)).astype(np.float32)
        take = min(len(piece), len(out) - pos)
        out[pos:pos + take] += piece[:take]
        pos += take
    return out


def write_audio(path: Path, samples: np.ndarray, rate: int = 16000, fmt: Optional[str] = None) -> Path:
    """Write ``samples`` ([n] or [n, channels]) to ``path`` in format ``fmt`` (default: from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or path.suffix.lstrip(".")
    major, subtype = FORMATS[fmt]
    sf.write(str(path), samples, rate, format=major, subtype=subtype)
    return path


def write_manifest(path: Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def make_corpus(
    root: Path,
    n: int = 12,
    min_seconds: float = 1.0,
    max_seconds: float = 3.0,
    rate: int = 16000,
    fmt: str = "wav",
    seed: int = 0,
    split: str = "audio",
    speakers: int = 3,
) -> Path:
    """``n`` speech-like utterances under ``root/split/`` and ``root/split.jsonl`` (paths relative)."""
    root = Path(root)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        seconds = round(rng.uniform(min_seconds, max_seconds), 3)
        speaker = f"spk{i % speakers}"
        rel = f"{split}/{speaker}/utt{i:04d}{SUFFIX[fmt]}"
        write_audio(root / rel, speechlike(seconds, rate, seed=seed * 1000 + i), rate, fmt)
        rows.append({"path": rel, "duration": round(sf.info(str(root / rel)).duration, 3), "speaker": speaker})
    return write_manifest(root / f"{split}.jsonl", rows)


# Each toy letter is a pair of tones (distinct per letter); the toy words use only these letters.
TOY_LETTERS = "ABCDEFGH"
_TOY_FREQS = {c: (300 + 170 * i, 1400 + 230 * ((i * 3) % len(TOY_LETTERS))) for i, c in enumerate(TOY_LETTERS)}


def toy_letter(letter: str, rate: int = 16000, seconds: float = 0.12) -> np.ndarray:
    lo, hi = _TOY_FREQS[letter]
    sig = tone(lo, seconds, rate, 0.25) + tone(hi, seconds, rate, 0.15)
    return sig * np.hanning(len(sig)).astype(np.float32)


def toy_utterance(text: str, rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pieces = [np.zeros(int(0.1 * rate), np.float32)]
    for ch in text:
        if ch == " ":
            pieces.append(np.zeros(int(rng.uniform(0.08, 0.15) * rate), np.float32))
        else:
            pieces.append(toy_letter(ch, rate, seconds=float(rng.uniform(0.10, 0.14))))
            pieces.append(np.zeros(int(0.02 * rate), np.float32))
    pieces.append(np.zeros(int(0.1 * rate), np.float32))
    sig = np.concatenate(pieces)
    return (sig + noise(len(sig) / rate, rate, 0.005, seed)).astype(np.float32)


def toy_text(rng: random.Random, words: int = 3) -> str:
    return " ".join("".join(rng.choice(TOY_LETTERS) for _ in range(rng.randint(2, 4))) for _ in range(words))


def make_toy_asr_corpus(root: Path, n: int = 40, seed: int = 0, split: str = "train", fmt: str = "flac",
                        rate: int = 16000) -> Path:
    """A labeled toy ASR corpus: ``root/split.jsonl`` with ``text`` over the letters in TOY_LETTERS."""
    root = Path(root)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = toy_text(rng, words=rng.randint(1, 3))
        rel = f"{split}/utt{i:04d}{SUFFIX[fmt]}"
        write_audio(root / rel, toy_utterance(text, rate, seed=seed * 1000 + i), rate, fmt)
        rows.append({"path": rel, "duration": round(sf.info(str(root / rel)).duration, 3),
                     "speaker": f"spk{i % 2}", "text": text})
    return write_manifest(root / f"{split}.jsonl", rows)
