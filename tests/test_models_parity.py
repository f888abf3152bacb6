"""Numerical parity of speech_ssl.models with transformers, torchaudio and the fairseq checkpoint layout.

Reference models are randomly initialised at BASE width (768-d, 12 heads, 3072 FFN, 512-channel conv
front end, 128-tap positional conv) with two Transformer layers, in eval mode, fp32; both front-end norm
modes (group norm + post-LN as BASE; layer norm + pre-LN + conv bias as LV-60k LARGE).
"""

from __future__ import annotations

import json

import pytest
import torch

from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import (Wav2Vec2ForCTC, Wav2Vec2ForPreTraining, Wav2Vec2Model, export_hf, from_torchaudio,
                               load, save_model, to_torchaudio_state_dict)

transformers = pytest.importorskip("transformers")
torchaudio = pytest.importorskip("torchaudio")

TOL = 1e-4
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate("abcdefghij")}}
MODES = {"group": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
         "layer": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)}


def hf_config(mode: str, **extra):
    return transformers.Wav2Vec2Config(num_hidden_layers=2, vocab_size=len(VOCAB), mask_time_prob=0.05,
                                       **MODES[mode], **extra)


def waveform(batch: int = 1, samples: int = 12000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, samples, generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module", params=["group", "layer"])
def hf_ctc(request, tmp_path_factory):
    """A random transformers Wav2Vec2ForCTC saved with save_pretrained, plus its directory."""
    torch.manual_seed(1)
    model = transformers.Wav2Vec2ForCTC(hf_config(request.param)).eval()
    directory = tmp_path_factory.mktemp(f"hf_ctc_{request.param}")
    model.save_pretrained(directory)
    return request.param, model, directory


@pytest.mark.timeout(120)
def test_transformers_ctc_hidden_states_and_logits(hf_ctc):
    mode, hf, directory = hf_ctc
    ours = load(directory)
    assert isinstance(ours, Wav2Vec2ForCTC) and ours.vocab_size == len(VOCAB)
    assert ours.config.conv_norm == mode and ours.config.layer_norm_first == (mode == "layer")
    ours.eval()
    x = waveform()
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        enc = ours.encoder(x, output_hidden_states=True)
        logits = ours(x).logits
    assert len(enc.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(enc.hidden_states, ref.hidden_states)):
        assert max_diff(a, b) < TOL, f"hidden state {i}"
    assert max_diff(logits, ref.logits) < TOL

    # max_layer stops early and returns that layer's output
    with torch.no_grad():
        first = ours.encoder(x, max_layer=1).last_hidden_state
    assert max_diff(first, ref.hidden_states[1]) < TOL


@pytest.mark.timeout(120)
def test_transformers_padded_batch_layer_norm(hf_ctc):
    mode, hf, directory = hf_ctc
    if mode != "layer":
        pytest.skip("transformers runs group-norm models without an attention mask")
    ours = load(directory).eval()
    x = waveform(2, 12000, seed=3)
    lengths = torch.tensor([12000, 8000])
    x[1, 8000:] = 0.0
    attention = (torch.arange(12000)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(x, attention_mask=attention).logits
        out = ours(x, lengths)
    valid = ~out.padding_mask
    assert out.lengths.tolist() == [37, 24]
    assert max_diff(out.logits[valid], ref[valid]) < TOL


@pytest.mark.timeout(120)
def test_export_then_transformers_reload(hf_ctc, tmp_path):
    mode, hf, directory = hf_ctc
    ours = load(directory).eval()
    export_hf(ours, tmp_path / "export", vocab=VOCAB)
    again = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "export").eval()
    x = waveform(seed=5)
    with torch.no_grad():
        assert max_diff(again(x).logits, hf(x).logits) < TOL
    processor = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "export")
    assert processor.tokenizer.pad_token_id == 0
    assert processor.feature_extractor.sampling_rate == 16000
    assert processor.tokenizer.decode([5, 5, 0, 6, 4, 7]) == "ab c"
    # and our own loader reads the export back (our extra config travels inside config.json)
    back = load(tmp_path / "export")
    assert back.config == ours.config


@pytest.mark.timeout(120)
def test_transformers_pretraining_model(tmp_path):
    """Quantizer, projections and mask embedding map too (eval: argmax codewords)."""
    torch.manual_seed(2)
    hf = transformers.Wav2Vec2ForPreTraining(hf_config("group")).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert isinstance(ours, Wav2Vec2ForPreTraining)
    ours.eval()
    x = waveform(seed=7)
    frames = int(ours.encoder.output_lengths(torch.tensor([x.shape[1]])))
    mask = torch.zeros(1, frames, dtype=torch.bool)
    mask[0, 5:15] = True
    with torch.no_grad():
        ref = hf(x, mask_time_indices=mask)
        feats = ours.encoder.extract_features(x)
        enc = ours.encoder.contextualize(feats, mask)
        projected = ours.context_projection(enc.last_hidden_state)
        quantized = ours.target_projection(ours.quantizer(feats.features[0]).quantized)
    assert max_diff(projected, ref.projected_states) < TOL
    assert max_diff(quantized, ref.projected_quantized_states[0]) < TOL
    # export as ForPreTraining and back into transformers
    export_hf(ours, tmp_path / "export")
    again = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        ref2 = again(x, mask_time_indices=mask)
    assert max_diff(ref2.projected_states, ref.projected_states) < TOL
    assert max_diff(ref2.projected_quantized_states, ref.projected_quantized_states) < TOL


@pytest.mark.timeout(120)
def test_contrastive_loss_equals_transformers_given_the_same_distractors(tmp_path, monkeypatch):
    """The pretraining objective against transformers' Wav2Vec2ForPreTraining on a padded-free batch of
    two: the same masked frames and the same distractors (transformers' sampler, handed to ours), eval
    mode (argmax codewords, no dropout): the summed contrastive loss and the masked frame count agree."""
    import speech_ssl.models.wav2vec2 as w2v
    from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

    torch.manual_seed(3)
    hf = transformers.Wav2Vec2ForPreTraining(hf_config("group")).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf").eval()
    x = waveform(batch=2, samples=16000, seed=8)
    frames = int(ours.encoder.output_lengths(torch.tensor([x.shape[1]])))
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[0, 3:20] = True
    mask[0, 30:41] = True
    mask[1, 10:35] = True
    negatives = _sample_negative_indices((2, frames), hf.config.num_negatives, mask_time_indices=mask.numpy())
    negatives = torch.as_tensor(negatives, dtype=torch.long)
    per_utterance = negatives - (torch.arange(2) * frames).view(2, 1, 1)  # ours: frame indices within the row
    monkeypatch.setattr(w2v, "sample_negatives", lambda mask_time, k: per_utterance)
    with torch.no_grad():
        ref = hf(x, mask_time_indices=mask, sampled_negative_indices=negatives)
        out = ours(x, mask_time=mask)
    assert out.sample_size == int(mask.sum())
    assert abs(out.logs["contrastive"] - float(ref.contrastive_loss)) < 1e-4 * float(ref.contrastive_loss)


@pytest.mark.timeout(120)
def test_transformers_base_model_and_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    hf = transformers.Wav2Vec2Model(hf_config("layer")).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert type(ours) is Wav2Vec2Model
    save_model(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["format"] == "speech-ssl"
    again = load(tmp_path / "ours").eval()
    x = waveform(seed=9)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        assert max_diff(again(x).last_hidden_state, ref) < TOL


# ----------------------------------------------------------------------------------------------------
# torchaudio
# ----------------------------------------------------------------------------------------------------

def torchaudio_model(mode: str):
    from torchaudio.models import wav2vec2_model

    return wav2vec2_model(
        extractor_mode="group_norm" if mode == "group" else "layer_norm", extractor_conv_layer_config=None,
        extractor_conv_bias=mode == "layer", encoder_embed_dim=768, encoder_projection_dropout=0.1,
        encoder_pos_conv_kernel=128, encoder_pos_conv_groups=16, encoder_num_layers=2, encoder_num_heads=12,
        encoder_attention_dropout=0.1, encoder_ff_interm_features=3072, encoder_ff_interm_dropout=0.1,
        encoder_dropout=0.1, encoder_layer_norm_first=mode == "layer", encoder_layer_drop=0.1,
        aux_num_out=len(VOCAB))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["group", "layer"])
def test_torchaudio_parity(mode, tmp_path):
    torch.manual_seed(4)
    ta = torchaudio_model(mode).eval()
    ours = from_torchaudio(ta).eval()
    assert isinstance(ours, Wav2Vec2ForCTC)
    x = waveform(seed=11)
    with torch.no_grad():
        layers, _ = ta.extract_features(x)
        ref_logits, _ = ta(x)
        enc = ours.encoder(x, output_hidden_states=True)
        logits = ours(x).logits
    # torchaudio's intermediate outputs are the raw layer outputs: hidden_states[1:] in our numbering
    for i, ref in enumerate(layers, start=1):
        assert max_diff(enc.hidden_states[i], ref) < TOL, f"layer {i}"
    assert max_diff(logits, ref_logits) < TOL

    # a bare state dict saved with torch.save loads through load() (config guessed from shapes)
    torch.save(ta.state_dict(), tmp_path / "ta.pt")
    again = load(tmp_path / "ta.pt").eval()
    with torch.no_grad():
        assert max_diff(again(x).logits, ref_logits) < TOL

    # and our weights go back into a fresh torchaudio model
    fresh = torchaudio_model(mode).eval()
    fresh.load_state_dict(to_torchaudio_state_dict(ours), strict=True)
    with torch.no_grad():
        assert max_diff(fresh(x)[0], ref_logits) < TOL


# ----------------------------------------------------------------------------------------------------
# fairseq checkpoint layout
# ----------------------------------------------------------------------------------------------------

def fairseq_layout(hf_state: dict[str, torch.Tensor], mode: str, ctc: bool) -> dict[str, torch.Tensor]:
    """The fairseq names of a transformers state dict (written out independently of our converter)."""
    out = {}
    for key, value in hf_state.items():
        k = key
        if k.startswith("wav2vec2."):
            k = k[len("wav2vec2."):]
        if k.startswith("lm_head."):
            out["w2v_encoder.proj." + k[len("lm_head."):]] = value
            continue
        parts = k.split(".")
        if k.startswith("feature_extractor.conv_layers."):
            i, kind, leaf = parts[2], parts[3], parts[4]
            if kind == "conv":
                k = f"feature_extractor.conv_layers.{i}.0.{leaf}"
            else:
                k = f"feature_extractor.conv_layers.{i}.2.{leaf}" if mode == "group" else \
                    f"feature_extractor.conv_layers.{i}.2.1.{leaf}"
        elif k.startswith("feature_projection.layer_norm."):
            k = "layer_norm." + parts[-1]
        elif k.startswith("feature_projection.projection."):
            k = "post_extract_proj." + parts[-1]
        elif k == "masked_spec_embed":
            k = "mask_emb"
        elif k.startswith("encoder.pos_conv_embed.conv."):
            leaf = {"original0": "weight_g", "original1": "weight_v"}.get(parts[-1], parts[-1])
            k = "encoder.pos_conv.0." + leaf
        elif k.startswith("encoder.layers."):
            i, rest = parts[2], ".".join(parts[3:])
            rest = (rest.replace("attention.", "self_attn.").replace("feed_forward.intermediate_dense", "fc1")
                    .replace("feed_forward.output_dense", "fc2"))
            if rest.startswith("layer_norm."):
                rest = "self_attn_layer_norm." + rest[len("layer_norm."):]
            k = f"encoder.layers.{i}.{rest}"
        elif k == "quantizer.codevectors":
            k = "quantizer.vars"
        elif k.startswith("project_hid."):
            k = "final_proj." + parts[-1]
        out[("w2v_encoder.w2v_model." if ctc else "") + k] = value.clone()
    return out


def fairseq_cfg(mode: str) -> dict:
    model = {"_name": "wav2vec2", "extractor_mode": "default" if mode == "group" else "layer_norm",
             "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
             "encoder_layers": 2, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
             "encoder_attention_heads": 12, "layer_norm_first": mode == "layer", "conv_bias": mode == "layer",
             "latent_temp": [2.0, 0.5, 0.999995], "feature_grad_mult": 0.1, "final_dim": 256}
    return {"model": model, "criterion": {"_name": "wav2vec", "loss_weights": [0.1, 10.0]},
            "task": {"_name": "audio_pretraining", "normalize": False}}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["group", "layer"])
def test_fairseq_pretraining_checkpoint(mode, tmp_path):
    torch.manual_seed(5)
    hf = transformers.Wav2Vec2ForPreTraining(hf_config(mode)).eval()
    state = fairseq_layout(hf.state_dict(), mode, ctc=False)
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"cfg": fairseq_cfg(mode), "model": state, "optimizer_history": [], "extra_state": {}}, path)
    ours = load(path)
    assert isinstance(ours, Wav2Vec2ForPreTraining)
    assert ours.config.feature_grad_scale == 0.1 and ours.config.conv_norm == mode
    ours.eval()
    x = waveform(seed=13)
    with torch.no_grad():
        ref = hf.wav2vec2(x, output_hidden_states=True)
        enc = ours.encoder(x, output_hidden_states=True)
    for a, b in zip(enc.hidden_states, ref.hidden_states):
        assert max_diff(a, b) < TOL


@pytest.mark.timeout(120)
def test_fairseq_ctc_checkpoint_needs_unsafe_load(tmp_path, monkeypatch):
    """A fairseq file holding an omegaconf config: refused safely, with the way out in the message."""
    from omegaconf import OmegaConf

    torch.manual_seed(6)
    hf = transformers.Wav2Vec2ForCTC(hf_config("layer")).eval()
    state = fairseq_layout(hf.state_dict(), "layer", ctc=True)
    cfg = {"model": {"_name": "wav2vec_ctc", "mask_prob": 0.5, "mask_channel_prob": 0.25, "layerdrop": 0.1,
                     "final_dropout": 0.0, "w2v_args": fairseq_cfg("layer")},
           "task": {"_name": "audio_finetuning", "normalize": True}}
    path = tmp_path / "ctc.pt"
    torch.save({"cfg": OmegaConf.create(cfg), "model": state}, path)

    monkeypatch.delenv("SPEECH_SSL_ALLOW_UNSAFE_PICKLE", raising=False)
    with pytest.raises(SpeechSSLError) as info:
        load(path)
    message = str(info.value)
    assert "allow_unsafe_pickle=True" in message and "SPEECH_SSL_ALLOW_UNSAFE_PICKLE=1" in message

    ours = load(path, allow_unsafe_pickle=True)
    assert isinstance(ours, Wav2Vec2ForCTC)
    assert ours.config.mask_prob == 0.5 and ours.config.mask_channel_prob == 0.25
    ours.eval()
    x = waveform(seed=17)
    with torch.no_grad():
        assert max_diff(ours(x).logits, hf(x).logits) < TOL

    monkeypatch.setenv("SPEECH_SSL_ALLOW_UNSAFE_PICKLE", "1")
    assert isinstance(load(path), Wav2Vec2ForCTC)
