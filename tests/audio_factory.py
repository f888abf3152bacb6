"""Generated audio for tests: signals, files in every supported format, and small corpora.

Tests never need data outside the repository: they build what they need here, in a tmp_path.

* ``tone``, ``chirp``, ``noise``: float32 signals.
* ``write_audio``: a file in wav / flac / ogg (vorbis) / opus / mp3, any rate and channel count.
* ``make_corpus``: a directory of varied utterances plus a JSONL manifest (the format of
  ``../shared/data/README.md``), optionally labeled.
* ``make_toy_asr_corpus``: a toy speech-recognition task a tiny CTC model can learn in a few hundred
  updates: each letter is a distinct tone pattern, words are separated by short silences.
* ``make_speaker_corpus``: "speakers" that differ in pitch and timbre (harmonic tilt), saying random
  voiced syllables: separable by a linear probe even on a random model's features; ``shuffle_labels``
  gives the same audio with speaker labels drawn at random (a probe must sit at chance there).
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


def toy_word(rng: random.Random) -> str:
    return "".join(rng.choice(TOY_LETTERS) for _ in range(rng.randint(2, 4)))


def toy_words(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct toy words: a closed vocabulary for corpora that share their words (a lexicon)."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < count:
        word = toy_word(rng)
        if word not in words:
            words.append(word)
    return words


def toy_text(rng: random.Random, words: int = 3, vocabulary: Optional[Sequence[str]] = None) -> str:
    return " ".join(rng.choice(vocabulary) if vocabulary else toy_word(rng) for _ in range(words))


def make_toy_asr_corpus(root: Path, n: int = 40, seed: int = 0, split: str = "train", fmt: str = "flac",
                        rate: int = 16000, words: Optional[Sequence[str]] = None) -> Path:
    """A labeled toy ASR corpus: ``root/split.jsonl`` with ``text`` over the letters in TOY_LETTERS.

    ``words``: draw every word from this list (e.g. ``toy_words(20)``), so that corpora made with the same
    list share a closed vocabulary; otherwise words are random letter strings.
    """
    root = Path(root)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = toy_text(rng, words=rng.randint(1, 3), vocabulary=words)
        rel = f"{split}/utt{i:04d}{SUFFIX[fmt]}"
        write_audio(root / rel, toy_utterance(text, rate, seed=seed * 1000 + i), rate, fmt)
        rows.append({"path": rel, "duration": round(sf.info(str(root / rel)).duration, 3),
                     "speaker": f"spk{i % 2}", "text": text})
    return write_manifest(root / f"{split}.jsonl", rows)


def voice(f0: float, tilt: float, seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Voiced syllables around fundamental ``f0`` (jittered +-6 %), harmonics falling off as k^-tilt, with
    short pauses between them."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(round(seconds * rate)), dtype=np.float32)
    pos = int(0.05 * rate)
    while pos < len(out):
        seg = float(rng.uniform(0.12, 0.3))
        n = int(seg * rate)
        t = np.arange(n) / rate
        pitch = f0 * float(rng.uniform(0.94, 1.06)) * (1 + 0.04 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        piece = sum((k ** -tilt) * np.sin(k * phase) for k in range(1, 16) if k * f0 < rate / 2 - 500)
        piece = (0.25 * piece / max(1e-6, np.abs(piece).max()) * np.hanning(n)).astype(np.float32)
        take = min(n, len(out) - pos)
        out[pos:pos + take] += piece[:take]
        pos += take + int(rng.uniform(0.03, 0.1) * rate)
    return (out + noise(seconds, rate, 0.003, seed)[: len(out)]).astype(np.float32)


def make_speaker_corpus(root: Path, speakers: int = 4, per_speaker: int = 12, seed: int = 0, split: str = "speakers",
                        min_seconds: float = 1.0, max_seconds: float = 1.6, rate: int = 16000,
                        shuffle_labels: bool = False, fmt: str = "flac") -> Path:
    """``speakers`` synthetic voices (pitch 100 Hz x 1.4^s, harmonic tilt alternating), ``per_speaker``
    utterances each, under ``root/split/`` and ``root/split.jsonl`` with a ``speaker`` field.

    shuffle_labels: the ``speaker`` field is drawn at random (same label counts), independent of the voice."""
    root = Path(root)
    rng = random.Random(seed)
    rows = []
    for s in range(speakers):
        f0, tilt = 100.0 * 1.4 ** s, (0.8 if s % 2 == 0 else 2.0)
        for i in range(per_speaker):
            seconds = round(rng.uniform(min_seconds, max_seconds), 3)
            rel = f"{split}/voice{s}/utt{s:02d}{i:03d}{SUFFIX[fmt]}"
            write_audio(root / rel, voice(f0, tilt, seconds, rate, seed=seed * 10007 + s * 101 + i), rate, fmt)
            rows.append({"path": rel, "duration": round(sf.info(str(root / rel)).duration, 3), "speaker": f"spk{s}"})
    if shuffle_labels:
        labels = [r["speaker"] for r in rows]
        random.Random(seed + 99).shuffle(labels)
        for row, label in zip(rows, labels):
            row["speaker"] = label
    return write_manifest(root / f"{split}.jsonl", rows)


# ---------------------------------------------------------------------------------------------------
# Corpora in every format, and a zoo of broken files (for the data tests)
# ---------------------------------------------------------------------------------------------------

# (format, sample rate, channels) of the good files: every supported format, several rates and layouts.
FORMAT_MATRIX = [
    ("wav", 16000, 1), ("wav", 8000, 1), ("wav", 44100, 2), ("wav", 22051, 1),
    ("flac", 16000, 1), ("flac", 22050, 2), ("flac", 48000, 3),
    ("ogg", 16000, 1), ("ogg", 48000, 2),
    ("opus", 16000, 1), ("opus", 48000, 2),
    ("mp3", 16000, 1), ("mp3", 44100, 2),
]


def multichannel(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """[n] for mono, else [n, channels] of related but distinct signals."""
    base = speechlike(seconds, rate, seed=seed)
    if channels == 1:
        return base
    return np.stack([base * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1).astype(np.float32)


def make_format_corpus(root: Path, seconds: float = 1.5, matrix=FORMAT_MATRIX) -> Path:
    """One good file per (format, rate, channels) under ``root/formats/`` and ``root/formats.jsonl``."""
    root = Path(root)
    rows = []
    for i, (fmt, rate, channels) in enumerate(matrix):
        rel = f"formats/{fmt}_{rate}_{channels}ch{SUFFIX[fmt]}"
        write_audio(root / rel, multichannel(seconds, rate, channels, seed=i), rate, fmt)
        rows.append({"path": rel, "duration": round(sf.info(str(root / rel)).duration, 4), "speaker": fmt})
    return write_manifest(root / "formats.jsonl", rows)


def _cut(src: Path, dst: Path, keep: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])


def _garble(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    start = len(data) // 3
    data[start:start + 400] = b"\x55" * 400
    dst.write_bytes(bytes(data))


# name -> (reason when decoded, reason from a header probe alone; None: the header looks fine)
BROKEN_EXPECTED = {
    "missing.wav": ("missing", "missing"),
    "empty.wav": ("empty", "empty"),
    "not_audio.flac": ("not-audio", "not-audio"),
    "header_only.flac": ("corrupt", "corrupt"),
    "garbled.opus": ("corrupt", "corrupt"),
    "truncated.wav": ("truncated", "truncated"),
    "truncated.ogg": ("truncated", "truncated"),
    "truncated.mp3": ("truncated", None),
    "truncated.flac": ("corrupt", None),
    "nan.wav": ("non-finite", None),
    "inf.wav": ("non-finite", None),
    "zero_length.wav": ("zero-length", "zero-length"),
}


def make_broken_zoo(root: Path, split: str = "broken") -> dict[str, Path]:
    """Every kind of bad file under ``root/split/`` (``missing.wav`` is named but not written).

    Returns name -> path; the expected reasons are in ``BROKEN_EXPECTED``.
    """
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    good = speechlike(2.0, 16000, seed=7)
    tmp = {fmt: write_audio(folder / f".src.{fmt}", good, 16000, fmt) for fmt in ("wav", "flac", "ogg", "opus", "mp3")}
    paths = {name: folder / name for name in BROKEN_EXPECTED}
    paths["empty.wav"].write_bytes(b"")
    paths["not_audio.flac"].write_text("this is a transcript, not audio\n" * 50)
    paths["header_only.flac"].write_bytes(tmp["flac"].read_bytes()[:40])
    _garble(tmp["opus"], paths["garbled.opus"])
    _cut(tmp["wav"], paths["truncated.wav"], 0.5)
    _cut(tmp["ogg"], paths["truncated.ogg"], 0.5)
    _cut(tmp["mp3"], paths["truncated.mp3"], 0.5)
    _cut(tmp["flac"], paths["truncated.flac"], 0.5)
    nan = good.copy()
    nan[1000] = np.nan
    sf.write(str(paths["nan.wav"]), nan, 16000, subtype="FLOAT")
    inf = good.copy()
    inf[2000] = np.inf
    sf.write(str(paths["inf.wav"]), inf, 16000, subtype="FLOAT")
    sf.write(str(paths["zero_length.wav"]), np.zeros(0, np.float32), 16000)
    for p in tmp.values():
        p.unlink()
    return paths


def make_mixed_manifest(root: Path, good: int = 8, seed: int = 0, labeled: bool = False) -> tuple[Path, dict[str, str]]:
    """``root/mixed.jsonl``: ``good`` good utterances plus the whole zoo (durations given, as a user's
    manifest would, so bad files are found when decoded). Returns the manifest and name -> decode reason."""
    root = Path(root)
    rng = random.Random(seed)
    rows = []
    for i in range(good):
        rel = f"good/utt{i:03d}.flac"
        seconds = round(rng.uniform(1.0, 2.5), 3)
        write_audio(root / rel, speechlike(seconds, 16000, seed=seed * 100 + i), 16000)
        row = {"path": rel, "duration": seconds, "speaker": f"spk{i % 2}"}
        if labeled:
            row["text"] = toy_text(rng)
        rows.append(row)
    zoo = make_broken_zoo(root)
    for name in zoo:
        row = {"path": f"broken/{name}", "duration": 2.0}
        if labeled:
            row["text"] = toy_text(rng)
        rows.append(row)
    return write_manifest(root / "mixed.jsonl", rows), {f"broken/{n}": BROKEN_EXPECTED[n][0] for n in zoo}


def write_arpa(path: Path, word_log10: dict[str, float]) -> Path:
    """A KenLM-readable ARPA language model over ``word_log10`` (log10 unigram probabilities), written as
    a bigram model (KenLM wants at least bigrams) whose bigrams after ``<s>`` repeat the unigrams."""
    unigrams = {"<s>": -99.0, "</s>": -1.0, "<unk>": -5.0, **word_log10}
    bigrams = {f"<s> {w}": p for w, p in word_log10.items()}
    lines = ["\\data\\", f"ngram 1={len(unigrams)}", f"ngram 2={len(bigrams)}", "", "\\1-grams:"]
    lines += [f"{p:.4f}\t{w}\t0.0" for w, p in unigrams.items()]
    lines += ["", "\\2-grams:"] + [f"{p:.4f}\t{pair}" for pair, p in bigrams.items()] + ["", "\\end\\", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
