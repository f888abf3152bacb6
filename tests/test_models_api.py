"""The public API of speech_ssl.models: presets, overrides, CTC, freezing, our checkpoints, loading errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from speech_ssl.config import ConfigError
from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import (PRESET_NAMES, PRESETS, ModelConfig, Wav2Vec2ForCTC, Wav2Vec2ForPreTraining,
                               Wav2Vec2Model, build, build_ctc, export_hf, load, save_model)


def test_presets_and_sizes():
    assert PRESET_NAMES == ["tiny", "fbank-tiny", "base", "large", "large-lv60k"]
    for name in ("tiny", "fbank-tiny"):
        n = sum(p.numel() for p in build(name).parameters())
        assert 2e6 < n < 8e6, (name, n)
    base = PRESETS["base"]
    assert (base.embed_dim, base.num_layers, base.num_heads, base.ffn_dim) == (768, 12, 12, 3072)
    assert base.conv_norm == "group" and not base.layer_norm_first
    lv = PRESETS["large-lv60k"]
    assert (lv.embed_dim, lv.num_layers, lv.conv_norm, lv.layer_norm_first) == (1024, 24, "layer", True)
    json.dumps(dataclasses.asdict(lv))  # JSON-serialisable


def test_unknown_override_names_the_key_and_the_fields():
    with pytest.raises(ConfigError) as info:
        build("tiny", mask_probability=0.5)
    text = info.value.paragraph()
    assert "mask_probability" in text and "mask_prob" in text and "num_negatives" in text
    with pytest.raises(ConfigError):
        build("tiny", num_heads=7)  # 256 not divisible by 7
    with pytest.raises(ConfigError):
        build("no-such-preset")
    assert build("tiny", mask_prob=0.3).config.mask_prob == 0.3


def test_model_override_keys_for_the_cli():
    from speech_ssl.models import ModelOverrides

    keys = [f.name for f in dataclasses.fields(ModelOverrides)]
    assert "mask_prob" in keys and "frontend" in keys and keys == [f.name for f in dataclasses.fields(ModelConfig)]


def test_ctc_forward_loss_and_freezing():
    torch.manual_seed(0)
    model = build_ctc("tiny", vocab_size=12, mask_prob=0.2, mask_channel_prob=0.1)
    x = 0.3 * torch.randn(2, 16000)
    lengths = torch.tensor([16000, 12000])
    out = model(x, lengths)
    assert out.logits.shape == (2, 49, 12) and out.lengths.tolist() == [49, 37]
    targets = torch.tensor([[5, 6, 7, 4, 8], [5, 5, 0, 0, 0]])
    loss = out.loss_sum(targets, torch.tensor([5, 2]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.ctc_head.weight.grad is not None

    model.freeze_feature_encoder()
    model.freeze_encoder(True)
    assert not any(p.requires_grad for p in model.encoder_parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    model.freeze_encoder(False)
    assert not any(p.requires_grad for p in model.encoder.feature_encoder.parameters())
    assert all(p.requires_grad for p in model.encoder.context.parameters())


def test_ctc_from_pretrained_encoder_keeps_weights_and_takes_overrides():
    pre = build("tiny")
    ctc = Wav2Vec2ForCTC.from_pretrained_encoder(pre.encoder, vocab_size=10, mask_channel_prob=0.5, layerdrop=0.1)
    assert ctc.config.mask_channel_prob == 0.5 and ctc.config.layerdrop == 0.1
    for key, value in pre.encoder.state_dict().items():
        assert torch.equal(ctc.encoder.state_dict()[key], value)
    with pytest.raises(ConfigError):
        Wav2Vec2ForCTC.from_pretrained_encoder(pre.encoder, vocab_size=10, not_a_field=1)


@pytest.mark.parametrize("kind", ["pretraining", "ctc", "encoder"])
def test_our_checkpoint_round_trip(kind, tmp_path):
    torch.manual_seed(1)
    if kind == "pretraining":
        model = build("fbank-tiny")
        model.set_num_updates(50_000)
    elif kind == "ctc":
        model = build_ctc("fbank-tiny", vocab_size=9)
    else:
        model = Wav2Vec2Model(PRESETS["fbank-tiny"])
    save_model(model, tmp_path / "ckpt", vocab={"<pad>": 0, "a": 1} if kind == "ctc" else None)
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "speech-ssl" and meta["format_version"] == 1
    assert meta["architecture"] == type(model).__name__ and meta["model"]["frontend"] == "fbank"
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = load(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if kind == "pretraining":
        assert loaded.temperature == pytest.approx(model.temperature) and loaded.temperature < 2.0


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(SpeechSSLError, match="no checkpoint"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpeechSSLError, match="config.json"):
        load(tmp_path / "empty")
    model = build("tiny")
    save_model(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(SpeechSSLError, match="newer"):
        load(tmp_path / "ckpt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SpeechSSLError, match="not a fairseq"):
        load(tmp_path / "other.pt")
    with pytest.raises(SpeechSSLError, match="filterbank"):
        export_hf(build("fbank-tiny"), tmp_path / "hf")


def test_max_layer_and_hidden_state_numbering():
    model = build("tiny").encoder.eval()
    x = 0.3 * torch.randn(1, 8000)
    with torch.no_grad():
        full = model(x, output_hidden_states=True)
        part = model(x, max_layer=2, output_hidden_states=True)
    assert len(full.hidden_states) == model.config.num_layers + 1
    assert len(part.hidden_states) == 3
    assert torch.allclose(part.last_hidden_state, full.hidden_states[2])
    # pre-LN: the final LayerNorm applies only when every layer ran
    assert not torch.allclose(full.last_hidden_state, full.hidden_states[-1])
