"""Audio files into model inputs: decode (soundfile), downmix, resample (torchaudio), normalise, fbank.

Everything here runs on Ray Data CPU workers (or in-process without Ray), never on training workers.
Bad audio raises :class:`~speech_ssl.data.report.QuarantineError` with a reason code:

* ``missing`` / ``empty``: no file, or a file of zero bytes;
* ``not-audio``: libsndfile does not recognise the format;
* ``corrupt``: a recognised format that fails to open or decode (malformed, lost sync);
* ``truncated``: fewer frames than the header promises (WAV data chunk cut short, Ogg stream without
  its end, MP3/FLAC frames missing);
* ``zero-length``: no samples; ``non-finite``: NaN or infinite samples; ``too-short``: shorter than
  one filterbank frame.

Resampling is ``torchaudio.transforms.Resample`` (the same sinc-interpolation kernel as
``torchaudio.functional.resample``), cached per rate pair. Rates whose ratio to the target reduces to a
large fraction (e.g. 22051 Hz -> 16 kHz) would need a kernel of hundreds of millions of taps; they are
resampled through the nearest fraction with a denominator of at most 1000 (relative rate error below
1e-6), so an odd rate never exhausts memory.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from speech_ssl.data.report import QuarantineError
from speech_ssl.errors import SpeechSSLError

if TYPE_CHECKING:
    import soundfile as sf


def _soundfile():
    """soundfile, imported when a file is decoded (importing speech_ssl.data needs no decoder: the GPU
    benchmarks and the embedder run on machines without one)."""
    try:
        import soundfile
    except (ModuleNotFoundError, OSError) as err:  # OSError: the package without its libsndfile
        raise SpeechSSLError(f"decoding audio files needs the soundfile package and libsndfile ({err}); "
                             "pip install soundfile") from None
    return soundfile

NORM_EPS = 1e-7  # the variance floor of transformers' Wav2Vec2FeatureExtractor (zero-mean unit-var)
FBANK_SCALE = 32768.0  # Kaldi features expect 16-bit sample values (as fairseq's and SeamlessM4T's fbank)
MAX_RATE_TERM = 1000  # largest numerator/denominator of the resampling ratio handed to torchaudio
REACH_TIMEOUT_S = 15.0  # an object store that does not answer a first request within this is unreachable


@dataclass(frozen=True)
class FeatureSpec:
    """What the model consumes.

    kind: ``waveform`` ([T] samples) or ``fbank`` ([frames, n_mels] Kaldi log-mel filterbank).
    sample_rate: everything is resampled to this rate.
    normalize: per utterance: zero mean / unit variance waveform, or per-bin mean/variance normalised
        fbank (the model config decides: wav2vec 2.0 BASE does not normalise, LARGE-LV60 does).
    frame_shift_ms / frame_length_ms: fbank framing (Kaldi defaults, no dither, snip_edges).
    """

    kind: str = "waveform"
    sample_rate: int = 16000
    n_mels: int = 80
    normalize: bool = False
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0

    def __post_init__(self) -> None:
        if self.kind not in ("waveform", "fbank"):
            raise ValueError(f"FeatureSpec.kind must be 'waveform' or 'fbank', got {self.kind!r}")

    @property
    def unit_seconds(self) -> float:
        """Seconds per step of the time axis (one sample, or one frame shift)."""
        return 1.0 / self.sample_rate if self.kind == "waveform" else self.frame_shift_ms / 1000.0

    @property
    def frame_length(self) -> int:
        return int(round(self.sample_rate * self.frame_length_ms / 1000.0))

    @property
    def frame_shift(self) -> int:
        return int(round(self.sample_rate * self.frame_shift_ms / 1000.0))

    def num_steps(self, num_samples: int) -> int:
        """Length of the time axis for ``num_samples`` samples at ``sample_rate``."""
        if self.kind == "waveform":
            return num_samples
        if num_samples < self.frame_length:
            return 0
        return 1 + (num_samples - self.frame_length) // self.frame_shift


# ---------------------------------------------------------------------------------------------------
# Opening files (local paths and pyarrow-filesystem URIs)
# ---------------------------------------------------------------------------------------------------

def is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=32)
def _filesystem(scheme_and_host: str):
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(scheme_and_host + "/")
    return fs


def split_uri(uri: str):
    """``s3://bucket/key`` -> (pyarrow filesystem, path inside it)."""
    import pyarrow.fs as pafs

    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    host = rest.split("/", 1)[0]
    fs = _filesystem(f"{scheme}://{host}")
    _, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def within_timeout(what: str, call: Callable[[], Any], timeout: float = REACH_TIMEOUT_S) -> Any:
    """``call()``, or a SpeechSSLError naming ``what`` if it does not return within ``timeout`` seconds (an
    object store that cannot be reached retries for minutes on its own)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="speech-ssl-reach")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise SpeechSSLError(f"cannot reach {what}: no answer within {timeout:g} s (is the address right, the "
                             "network up and are credentials set?)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


class AudioFile:
    """``with AudioFile(path) as f`` gives an open ``soundfile.SoundFile``; errors become QuarantineError."""

    def __init__(self, path: str):
        self.path = path
        self._raw: Any = None
        self.sound: Optional[sf.SoundFile] = None

    def __enter__(self) -> sf.SoundFile:
        sf = _soundfile()
        source: Any = self.path
        try:
            if is_uri(self.path):
                fs, inner = split_uri(self.path)
                self._raw = fs.open_input_file(inner)
                if self._raw.size() == 0:
                    raise QuarantineError("empty", "file has 0 bytes")
                source = self._raw
            elif os.path.getsize(self.path) == 0:
                raise QuarantineError("empty", "file has 0 bytes")
        except FileNotFoundError:
            self.close()
            raise QuarantineError("missing", "no such file") from None
        except IsADirectoryError:
            self.close()
            raise QuarantineError("unreadable", "is a directory") from None
        except PermissionError as err:
            self.close()
            raise QuarantineError("unreadable", str(err)) from None
        except QuarantineError:
            self.close()
            raise
        except OSError as err:  # pyarrow raises OSError for a missing object on some filesystems
            self.close()
            if "not found" in str(err).lower() or "no such file" in str(err).lower():
                raise QuarantineError("missing", str(err)) from None
            raise QuarantineError("unreadable", str(err)) from None
        try:
            self.sound = sf.SoundFile(source)
        except sf.LibsndfileError as err:
            self.close()
            raise _classify_open_error(err) from None
        except (RuntimeError, TypeError, ValueError) as err:
            self.close()
            raise QuarantineError("corrupt", str(err)) from None
        return self.sound

    def close(self) -> None:
        if self.sound is not None:
            self.sound.close()
            self.sound = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def __exit__(self, *exc) -> None:
        self.close()


def _classify_open_error(err: Exception) -> QuarantineError:
    text = str(getattr(err, "error_string", "") or err)
    if "Format not recognised" in text or "format not recognised" in text.lower():
        return QuarantineError("not-audio", "format not recognised")
    return QuarantineError("corrupt", text.split(": ", 1)[-1] if "Error opening" in text else text)


_WAV_DATA = re.compile(r"\bdata\s*:\s*(\d+)\s*\(should be\s*(\d+)\)")
_STREAMED_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 7}  # "unknown length" markers of streaming writers


def truncation_in_header(sound: sf.SoundFile) -> Optional[str]:
    """libsndfile's parse log tells a WAV cut short, or an Ogg stream missing its end; None if fine."""
    try:
        log = sound.extra_info
    except Exception:  # pragma: no cover - log unavailable
        return None
    match = _WAV_DATA.search(log)
    if match:
        declared, present = int(match.group(1)), int(match.group(2))
        if declared not in _STREAMED_SIZES and declared - present > 16:
            return f"header promises {declared} data bytes, file holds {present}"
    if "ended unexpectedly" in log:
        return "stream ends without its end-of-stream page"
    return None


@dataclass
class AudioHeader:
    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def probe_header(path: str) -> AudioHeader:
    """Duration and format from the file header only (no full decode). Raises QuarantineError."""
    with AudioFile(path) as sound:
        reason = truncation_in_header(sound)
        if reason:
            raise QuarantineError("truncated", reason)
        header = AudioHeader(int(sound.frames), int(sound.samplerate), int(sound.channels), sound.format,
                             sound.subtype)
    if header.frames <= 0:
        raise QuarantineError("zero-length", "no samples")
    if header.sample_rate <= 0:
        raise QuarantineError("corrupt", f"sample rate {header.sample_rate}")
    return header


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------

def read_audio(path: str, start: float = 0.0, end: Optional[float] = None) -> tuple[np.ndarray, int]:
    """Samples ``[frames, channels]`` float32 and the native rate, of the whole file or [start, end) s."""
    with AudioFile(path) as sound:
        reason = truncation_in_header(sound)
        if reason:
            raise QuarantineError("truncated", reason)
        rate = int(sound.samplerate)
        if rate <= 0:
            raise QuarantineError("corrupt", f"sample rate {rate}")
        total = int(sound.frames)
        first = int(round(start * rate)) if start else 0
        last = total if end is None else min(total, int(round(end * rate)))
        want = max(0, last - first)
        sf = _soundfile()
        try:
            if first:
                sound.seek(first)
            samples = sound.read(want, dtype="float32", always_2d=True)
        except sf.LibsndfileError as err:
            raise QuarantineError("corrupt", str(err).split(": ", 1)[-1]) from None
        except RuntimeError as err:
            raise QuarantineError("corrupt", str(err)) from None
    if total <= 0:
        raise QuarantineError("zero-length", "no samples")
    if want == 0:
        raise QuarantineError("truncated", f"segment starts at frame {first}, the file has {total}")
    if samples.shape[0] < want:
        raise QuarantineError("truncated", f"decoded {samples.shape[0]} of {want} frames")
    return samples, rate


def downmix(samples: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames] (mean of the channels)."""
    if samples.ndim == 1:
        return samples
    if samples.shape[1] == 1:
        return samples[:, 0]
    return samples.mean(axis=1, dtype=np.float32)


def resample_ratio(orig: int, new: int) -> tuple[int, int]:
    """The (orig, new) pair handed to torchaudio: reduced, and approximated when the terms are huge."""
    g = math.gcd(orig, new)
    orig_r, new_r = orig // g, new // g
    if orig_r <= MAX_RATE_TERM and new_r <= MAX_RATE_TERM:
        return orig, new
    frac = Fraction(new, orig).limit_denominator(MAX_RATE_TERM)
    while frac.numerator > MAX_RATE_TERM * max(1, new // orig + 1):  # pragma: no cover - extreme upsampling
        frac = Fraction(new, orig).limit_denominator(frac.denominator // 2)
    return frac.denominator, frac.numerator


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int):
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)


def resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """[T] at ``orig`` Hz -> [T'] at ``new`` Hz with torchaudio's sinc resampler (kernel cached per pair)."""
    if orig == new:
        return wave
    import torch

    orig_eff, new_eff = resample_ratio(orig, new)
    with torch.inference_mode():
        out = _resampler(orig_eff, new_eff)(torch.from_numpy(np.ascontiguousarray(wave)))
    return out.numpy()


def normalize_waveform(wave: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (the per-utterance normalisation of wav2vec 2.0 LARGE / transformers)."""
    wave = wave.astype(np.float32, copy=False)
    # transformers' (x - mean) / sqrt(var + eps) in two passes instead of numpy's var (which recomputes the
    # mean and squares into a temporary): the same values to float32 rounding, half the CPU per row.
    centred = wave - wave.mean(dtype=np.float32)
    variance = np.dot(centred, centred) / np.float32(max(1, centred.size))
    centred /= np.sqrt(variance + np.float32(NORM_EPS))
    return centred


def fbank(wave: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Kaldi log-mel filterbank [frames, n_mels] of a [T] waveform at ``spec.sample_rate``."""
    import torch
    import torchaudio

    if wave.shape[0] < spec.frame_length:
        raise QuarantineError("too-short", f"{wave.shape[0]} samples, less than one {spec.frame_length_ms} ms frame")
    with torch.inference_mode():
        feats = torchaudio.compliance.kaldi.fbank(
            torch.from_numpy(np.ascontiguousarray(wave))[None] * FBANK_SCALE,
            num_mel_bins=spec.n_mels, frame_shift=spec.frame_shift_ms, frame_length=spec.frame_length_ms,
            sample_frequency=spec.sample_rate, dither=0.0)
    feats = feats.numpy()
    return normalize_fbank(feats) if spec.normalize else feats.astype(np.float32, copy=False)


def normalize_fbank(feats: np.ndarray) -> np.ndarray:
    """Per-utterance mean/variance normalisation of [frames, n_mels] filterbank features (per bin)."""
    feats = feats.astype(np.float32, copy=False)
    return ((feats - feats.mean(axis=0)) / np.sqrt(feats.var(axis=0) + NORM_EPS)).astype(np.float32, copy=False)


def normalize_features(feats: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """The per-utterance normalisation ``spec`` asks for, of raw features (what the cache stores)."""
    if not spec.normalize:
        return feats
    return normalize_fbank(feats) if spec.kind == "fbank" else normalize_waveform(feats)


def decode_file(path: str, spec: FeatureSpec, start: float = 0.0, end: Optional[float] = None) -> np.ndarray:
    """Decode, downmix, resample, check and featurise one file (or its [start, end) segment)."""
    samples, rate = read_audio(path, start, end)
    wave = downmix(samples)
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).sum())
        raise QuarantineError("non-finite", f"{bad} NaN or infinite samples")
    wave = resample(wave, rate, spec.sample_rate)
    if wave.shape[0] == 0:
        raise QuarantineError("zero-length", "no samples after resampling")
    if spec.kind == "fbank":
        return fbank(wave, spec)
    return normalize_waveform(wave) if spec.normalize else wave.astype(np.float32, copy=False)


def decode_utterance(utt, spec: FeatureSpec) -> np.ndarray:
    """Features of one :class:`~speech_ssl.data.sources.Utterance`: [T] waveform or [frames, n_mels].

    Raises QuarantineError(reason) for bad audio.
    """
    return decode_file(utt.path, spec, utt.start, utt.end)
