"""Decoding: every format, rates and channel layouts; resampling and fbank against torchaudio; the zoo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from audio_factory import BROKEN_EXPECTED, FORMAT_MATRIX, make_broken_zoo, make_format_corpus, speechlike, write_audio
from speech_ssl.data import FeatureSpec, QuarantineError, Utterance, decode_utterance
from speech_ssl.data.audio import probe_header, resample, resample_ratio

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    manifest = make_format_corpus(root)
    return root, [json.loads(line) for line in open(manifest)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_broken_zoo(tmp_path_factory.mktemp("zoo"))


def _utt(path, duration=1.5, start=0.0, end=None):
    return Utterance(id="u", path=str(path), source_path=str(path), duration=duration, start=start, end=end)


def test_every_format_rate_and_layout_decodes_to_16k_mono(formats):
    root, rows = formats
    assert {fmt for fmt, _, _ in FORMAT_MATRIX} == {"wav", "flac", "ogg", "opus", "mp3"}
    for row in rows:
        path = root / row["path"]
        native, rate = sf.read(str(path), dtype="float32", always_2d=True)
        wave = decode_utterance(_utt(path), FeatureSpec("waveform"))
        assert wave.dtype == np.float32 and wave.ndim == 1, row["path"]
        # Length follows the resampling ratio exactly (ceil, as torchaudio); content is the downmix.
        assert abs(len(wave) - native.shape[0] * 16000 / rate) <= 1, row["path"]
        # torchaudio's resampler; an odd rate through the approximated ratio (the exact kernel is huge).
        orig_eff, new_eff = resample_ratio(rate, 16000)
        ref = torchaudio.functional.resample(torch.from_numpy(native.mean(axis=1)), orig_eff, new_eff).numpy()
        assert len(ref) == len(wave), row["path"]
        np.testing.assert_allclose(wave, ref, atol=2e-5, err_msg=row["path"])


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
def test_resampling_matches_torchaudio(orig):
    x = speechlike(1.0, orig, seed=orig)
    ours = resample(x, orig, 16000)
    theirs = torchaudio.functional.resample(torch.from_numpy(x), orig, 16000).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    # Exactly torchaudio's Resample transform (whose kernel we cache per rate pair).
    np.testing.assert_array_equal(ours, torchaudio.transforms.Resample(orig, 16000)(torch.from_numpy(x)).numpy())


def test_odd_rate_is_resampled_without_a_giant_kernel():
    assert resample_ratio(22051, 16000) != (22051, 16000)
    orig_eff, new_eff = resample_ratio(22051, 16000)
    assert orig_eff <= 1000 and new_eff <= 1000 and abs(new_eff / orig_eff - 16000 / 22051) < 1e-6
    x = speechlike(1.0, 22051, seed=1)
    out = resample(x, 22051, 16000)
    assert abs(len(out) - 16000) <= 2
    # A 440 Hz tone stays at 440 Hz.
    tone = np.sin(2 * np.pi * 440 * np.arange(22051) / 22051).astype(np.float32)
    spectrum = np.abs(np.fft.rfft(resample(tone, 22051, 16000)))
    assert abs(np.argmax(spectrum) * 16000 / len(resample(tone, 22051, 16000)) - 440) < 2


def test_fbank_matches_torchaudio_kaldi(tmp_path):
    x = speechlike(2.0, 16000, seed=3)
    path = write_audio(tmp_path / "a.flac", x, 16000)
    decoded = sf.read(str(path), dtype="float32")[0]
    ref = torchaudio.compliance.kaldi.fbank(torch.from_numpy(decoded)[None] * 32768, num_mel_bins=80,
                                            frame_shift=10.0, frame_length=25.0, sample_frequency=16000,
                                            dither=0.0).numpy()
    feats = decode_utterance(_utt(path, 2.0), FeatureSpec("fbank", n_mels=80))
    assert feats.shape == ref.shape == (FeatureSpec("fbank").num_steps(len(decoded)), 80)
    np.testing.assert_allclose(feats, ref, atol=1e-4)
    normed = decode_utterance(_utt(path, 2.0), FeatureSpec("fbank", normalize=True))
    np.testing.assert_allclose(normed.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(normed.std(axis=0), 1, atol=1e-2)
    np.testing.assert_allclose(normed, (ref - ref.mean(0)) / np.sqrt(ref.var(0) + 1e-7), atol=1e-3)


def test_waveform_normalisation_is_zero_mean_unit_variance(tmp_path):
    path = write_audio(tmp_path / "a.wav", speechlike(1.0, 16000) + 0.2, 16000)
    raw = decode_utterance(_utt(path, 1.0), FeatureSpec("waveform"))
    wave = decode_utterance(_utt(path, 1.0), FeatureSpec("waveform", normalize=True))
    assert abs(raw.mean()) > 0.1
    assert abs(wave.mean()) < 1e-5 and abs(wave.std() - 1) < 1e-3


def test_segment_reads_the_right_samples(tmp_path):
    x = speechlike(3.0, 16000, seed=5)
    path = write_audio(tmp_path / "long.flac", x, 16000)
    seg = decode_utterance(_utt(path, 1.0, start=1.0, end=2.0), FeatureSpec("waveform"))
    np.testing.assert_allclose(seg, x[16000:32000], atol=1e-4)  # PCM_16 quantisation


@pytest.mark.parametrize("name", sorted(BROKEN_EXPECTED))
def test_zoo_decode_reasons(zoo, name):
    with pytest.raises(QuarantineError) as info:
        decode_utterance(_utt(zoo[name], 2.0), FeatureSpec("waveform"))
    assert info.value.reason == BROKEN_EXPECTED[name][0], info.value


@pytest.mark.parametrize("name", sorted(BROKEN_EXPECTED))
def test_zoo_header_reasons(zoo, name):
    expected = BROKEN_EXPECTED[name][1]
    if expected is None:
        assert probe_header(str(zoo[name])).frames > 0
    else:
        with pytest.raises(QuarantineError) as info:
            probe_header(str(zoo[name]))
        assert info.value.reason == expected, info.value


def test_too_short_for_a_filterbank_frame(tmp_path):
    path = write_audio(tmp_path / "blip.wav", speechlike(0.01, 16000), 16000)
    assert decode_utterance(_utt(path, 0.01), FeatureSpec("waveform")).shape == (160,)
    with pytest.raises(QuarantineError) as info:
        decode_utterance(_utt(path, 0.01), FeatureSpec("fbank"))
    assert info.value.reason == "too-short"
