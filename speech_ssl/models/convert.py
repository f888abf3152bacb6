"""Key maps and configs between our models and transformers, fairseq and torchaudio.

One hub layout: transformers' leaf names (``feature_extractor.conv_layers.0.conv.weight``...), which
torchaudio shares and fairseq maps onto by renaming. Each foreign layout is renamed into it, and the
hub is mapped onto our modules (where q, k and v are one fused projection). Export goes the other way.

* ``from_hf_state_dict`` / ``to_hf_state_dict``: full models (Wav2Vec2Model / ForPreTraining / ForCTC).
* ``config_from_hf`` / ``config_to_hf``: configuration dicts (``config.json``); ``hf_export_problem``:
  why a model cannot be exported to transformers (asked before writing anything).
* ``fairseq_to_hf_keys`` + ``config_from_fairseq``: fairseq checkpoints (pretraining and CTC).
* ``torchaudio_to_hf_keys`` / ``hf_to_torchaudio_keys`` + ``config_from_torchaudio``.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from typing import Any, Optional

import torch
from torch import Tensor

from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import fastpath
from speech_ssl.models.config import ModelConfig, make_config

# ----------------------------------------------------------------------------------------------------
# transformers leaf names <-> ours (the encoder, no prefix)
# ----------------------------------------------------------------------------------------------------

_ENCODER_RULES: list[tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_encoder.layers.\1.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", r"feature_encoder.layers.\1.norm.\2"),
    (r"feature_projection\.layer_norm\.(weight|bias)", r"feature_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"feature_projection.\1"),
    (r"masked_spec_embed", r"mask_embedding"),
    (r"encoder\.pos_conv_embed\.conv\.(?:weight_g|parametrizations\.weight\.original0)", r"context.pos_conv.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.(?:weight_v|parametrizations\.weight\.original1)", r"context.pos_conv.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias", r"context.pos_conv.bias"),
    (r"encoder\.layer_norm\.(weight|bias)", r"context.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.attention\.out_proj\.(weight|bias)", r"context.layers.\1.attention.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"context.layers.\1.attention_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)", r"context.layers.\1.ffn.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)", r"context.layers.\1.ffn.fc2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"context.layers.\1.ffn_norm.\2"),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")

# Heads on top of the encoder: transformers name -> ours.
_HEAD_RULES: list[tuple[str, str]] = [
    (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.logits_proj.\1"),
    (r"project_q\.(weight|bias)", r"target_projection.\1"),
    (r"project_hid\.(weight|bias)", r"context_projection.\1"),
    (r"lm_head\.(weight|bias)", r"ctc_head.\1"),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> Optional[str]:
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


_OUR_CONV_WEIGHT = re.compile(r"feature_encoder\.layers\.\d+\.weight")


def _conv_layout(our_key: str, value: Tensor, to_ours: bool) -> Tensor:
    """A front-end convolution weight from Conv1d's layout to our kernels' (``to_ours``) or back; other
    tensors as they are."""
    if not _OUR_CONV_WEIGHT.fullmatch(our_key):
        return value
    return fastpath.conv_weight_from_conv1d(value) if to_ours else fastpath.conv_weight_to_conv1d(value)


def _encoder_from_hf(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """transformers encoder keys (no prefix) -> ours; returns the state dict and unknown keys."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        m = _QKV.fullmatch(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        name = _rename(key, _ENCODER_RULES)
        if name is None:
            unknown.append(key)
        else:
            out[name] = _conv_layout(name, value, to_ours=True)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise SpeechSSLError(f"layer {layer}: attention {kind} needs q, k and v projections; found {sorted(parts)}")
        out[f"context.layers.{layer}.attention.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out, unknown


def _encoder_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our encoder keys (no prefix) -> transformers names (weight norm as parametrizations)."""
    inverse = [
        (r"feature_encoder\.layers\.(\d+)\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
        (r"feature_encoder\.layers\.(\d+)\.norm\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
        (r"feature_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
        (r"feature_projection\.(weight|bias)", r"feature_projection.projection.\1"),
        (r"mask_embedding", r"masked_spec_embed"),
        (r"context\.pos_conv\.weight_g", r"encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
        (r"context\.pos_conv\.weight_v", r"encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
        (r"context\.pos_conv\.bias", r"encoder.pos_conv_embed.conv.bias"),
        (r"context\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
        (r"context\.layers\.(\d+)\.attention\.out_proj\.(weight|bias)", r"encoder.layers.\1.attention.out_proj.\2"),
        (r"context\.layers\.(\d+)\.attention_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
        (r"context\.layers\.(\d+)\.ffn\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
        (r"context\.layers\.(\d+)\.ffn\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
        (r"context\.layers\.(\d+)\.ffn_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    ]
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"context\.layers\.(\d+)\.attention\.qkv_proj\.(weight|bias)", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"encoder.layers.{m.group(1)}.attention.{name}_proj.{m.group(2)}"] = part.clone()
            continue
        name = _rename(key, inverse)
        if name is None:
            raise KeyError(f"no transformers name for {key}")
        out[name] = _conv_layout(key, value, to_ours=False)
    return out


def detect_architecture(keys: list[str]) -> str:
    """Which of our classes a transformers-layout state dict holds."""
    if any(k.startswith("lm_head.") for k in keys):
        return "Wav2Vec2ForCTC"
    if any(k.startswith("quantizer.") for k in keys):
        return "Wav2Vec2ForPreTraining"
    return "Wav2Vec2Model"


def from_hf_state_dict(sd: dict[str, Tensor], architecture: str) -> dict[str, Tensor]:
    """A transformers-layout state dict -> ours for ``architecture`` (our class name)."""
    if architecture == "Wav2Vec2Model":
        encoder_sd = {k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k: v for k, v in sd.items()}
        out, unknown = _encoder_from_hf(encoder_sd)
        _fail_unknown(unknown)
        return out
    encoder_sd = {k[len("wav2vec2."):]: v for k, v in sd.items() if k.startswith("wav2vec2.")}
    out, unknown = _encoder_from_hf(encoder_sd)
    out = {f"encoder.{k}": v for k, v in out.items()}
    for key, value in sd.items():
        if key.startswith("wav2vec2."):
            continue
        if key == "quantizer.codevectors":
            out["quantizer.codebook"] = value.reshape(-1, value.shape[-1])
            continue
        name = _rename(key, _HEAD_RULES)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    _fail_unknown(unknown)
    return out


def to_hf_state_dict(sd: dict[str, Tensor], architecture: str) -> dict[str, Tensor]:
    """Our state dict -> transformers names for ``architecture``."""
    if architecture == "Wav2Vec2Model":
        return _encoder_to_hf(sd)
    out = {f"wav2vec2.{k}": v for k, v in _encoder_to_hf(
        {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}).items()}
    inverse_heads = [(r"quantizer\.logits_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
                     (r"target_projection\.(weight|bias)", r"project_q.\1"),
                     (r"context_projection\.(weight|bias)", r"project_hid.\1"),
                     (r"ctc_head\.(weight|bias)", r"lm_head.\1")]
    for key, value in sd.items():
        if key.startswith("encoder.") or key == "quantizer.temperature":
            continue
        if key == "quantizer.codebook":
            out["quantizer.codevectors"] = value.unsqueeze(0)
            continue
        name = _rename(key, inverse_heads)
        if name is None:
            raise KeyError(f"no transformers name for {key}")
        out[name] = value
    return out


def _fail_unknown(unknown: list[str]) -> None:
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise SpeechSSLError(f"the checkpoint has weights this wav2vec 2.0 implementation does not know: {shown}"
                             f"{' ...' if len(unknown) > 8 else ''} (an unsupported variant?)")


# ----------------------------------------------------------------------------------------------------
# transformers config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------------

HF_EXTRA_KEY = "speech_ssl_model"  # our full config, kept inside an exported config.json

# Our ModelConfig field -> (transformers' Wav2Vec2Config key, transformers' default): the one map, read in
# both directions (config_from_hf, config_to_hf).
HF_FIELDS: dict[str, tuple[str, Any]] = {
    "conv_channels": ("conv_dim", [512] * 7),
    "conv_kernels": ("conv_kernel", [10, 3, 3, 3, 3, 2, 2]),
    "conv_strides": ("conv_stride", [5, 2, 2, 2, 2, 2, 2]),
    "conv_bias": ("conv_bias", False),
    "conv_norm": ("feat_extract_norm", "group"),
    "embed_dim": ("hidden_size", 768),
    "num_layers": ("num_hidden_layers", 12),
    "num_heads": ("num_attention_heads", 12),
    "ffn_dim": ("intermediate_size", 3072),
    "layer_norm_first": ("do_stable_layer_norm", False),
    "layer_norm_eps": ("layer_norm_eps", 1e-5),
    "pos_conv_kernel": ("num_conv_pos_embeddings", 128),
    "pos_conv_groups": ("num_conv_pos_embedding_groups", 16),
    "dropout": ("hidden_dropout", 0.1),
    "attention_dropout": ("attention_dropout", 0.1),
    "activation_dropout": ("activation_dropout", 0.1),
    "dropout_input": ("feat_proj_dropout", 0.0),
    "dropout_features": ("feat_quantizer_dropout", 0.0),
    "layerdrop": ("layerdrop", 0.1),
    "final_dropout": ("final_dropout", 0.1),
    "mask_prob": ("mask_time_prob", 0.05),
    "mask_length": ("mask_time_length", 10),
    "mask_min_masks": ("mask_time_min_masks", 2),
    "mask_channel_prob": ("mask_feature_prob", 0.0),
    "mask_channel_length": ("mask_feature_length", 10),
    "num_negatives": ("num_negatives", 100),
    "logit_temp": ("contrastive_logits_temperature", 0.1),
    "codebook_groups": ("num_codevector_groups", 2),
    "codebook_entries": ("num_codevectors_per_group", 320),
    "codebook_dim": ("codevector_dim", 256),
    "final_dim": ("proj_codevector_dim", 256),
    "diversity_weight": ("diversity_loss_weight", 0.1),
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A transformers Wav2Vec2Config dict -> ModelConfig (fields transformers lacks: from our saved copy,
    else the fairseq defaults for that norm mode)."""
    if hf.get("model_type") != "wav2vec2":
        raise SpeechSSLError(f"model_type {hf.get('model_type')!r} is not wav2vec2; only wav2vec 2.0 checkpoints "
                             "can be loaded")
    for key, allowed in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
        if hf.get(key, allowed) != allowed:
            raise SpeechSSLError(f"unsupported transformers config: {key}={hf[key]!r} (only {allowed!r})")
    if hf.get("add_adapter"):
        raise SpeechSSLError("unsupported transformers config: add_adapter=true")
    conv_norm = hf.get("feat_extract_norm", "group")
    layer_mode = conv_norm == "layer"
    base = dict(hf.get(HF_EXTRA_KEY) or {})
    if not base:
        base = dict(feature_grad_scale=1.0 if layer_mode else 0.1,
                    feature_penalty_weight=0.0 if layer_mode else 10.0,
                    temperature_min=0.1 if layer_mode else 0.5)
    mapped = {ours: hf.get(theirs, default) for ours, (theirs, default) in HF_FIELDS.items()}
    for key in ("conv_channels", "conv_kernels", "conv_strides"):
        mapped[key] = list(mapped[key])
    for key in ("conv_bias", "layer_norm_first"):
        mapped[key] = bool(mapped[key])
    if not hf.get("apply_spec_augment", True):
        mapped["mask_prob"] = mapped["mask_channel_prob"] = 0.0
    base.update(mapped)
    base["frontend"] = "conv"
    return make_config(base)


def hf_export_problem(cfg: ModelConfig) -> Optional[str]:
    """Why a model with ``cfg`` has no transformers ``Wav2Vec2`` equivalent, or None when it has one.

    Asked before anything is written, so a refused export leaves no output behind."""
    if cfg.frontend != "conv":
        return (f"transformers' Wav2Vec2 has no filterbank front end: a model with frontend={cfg.frontend!r} "
                "(the fbank-* presets) cannot be exported to the transformers layout")
    return None


def config_to_hf(cfg: ModelConfig, architecture: str, vocab_size: Optional[int] = None) -> dict[str, Any]:
    problem = hf_export_problem(cfg)
    if problem is not None:
        raise SpeechSSLError(problem)
    hf = {
        "model_type": "wav2vec2",
        "architectures": [architecture],
        **{theirs: _plain(getattr(cfg, ours)) for ours, (theirs, _) in HF_FIELDS.items()},
        "hidden_act": "gelu",
        "feat_extract_activation": "gelu",
        "num_feat_extract_layers": len(cfg.conv_channels),
        "initializer_range": 0.02,
        "apply_spec_augment": True,
        "mask_feature_min_masks": 0,
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": True,
        "use_weighted_layer_sum": False,
        "add_adapter": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        HF_EXTRA_KEY: dataclasses.asdict(cfg),
    }
    if vocab_size is not None:
        hf["vocab_size"] = vocab_size
    return hf


# ----------------------------------------------------------------------------------------------------
# fairseq
# ----------------------------------------------------------------------------------------------------

_FAIRSEQ_RULES: list[tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_emb", r"masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.(weight_g|weight_v|bias)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.(original[01])",
     r"encoder.pos_conv_embed.conv.parametrizations.weight.\1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv]|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]
_FAIRSEQ_HEADS: list[tuple[str, str]] = [
    (r"quantizer\.vars", r"quantizer.codevectors"),
    (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
    (r"project_q\.(weight|bias)", r"project_q.\1"),
    (r"final_proj\.(weight|bias)", r"project_hid.\1"),
]
_FAIRSEQ_IGNORED = re.compile(r"(.*\._float_tensor|.*\.version|_ema|encoder\.layers\.\d+\.self_attn\.bias_[kv])")


def fairseq_to_hf_keys(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """A fairseq wav2vec 2.0 state dict (pretraining or CTC) -> transformers names and our class name."""
    ctc = any(k.startswith("w2v_encoder.") for k in sd)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if _FAIRSEQ_IGNORED.fullmatch(key):
            continue
        if ctc:
            if key.startswith("w2v_encoder.proj."):
                out["lm_head." + key[len("w2v_encoder.proj."):]] = value
                continue
            if not key.startswith("w2v_encoder.w2v_model."):
                unknown.append(key)
                continue
            key = key[len("w2v_encoder.w2v_model."):]
        name = _rename(key, _FAIRSEQ_RULES)
        if name is not None:
            out["wav2vec2." + name] = value
            continue
        name = _rename(key, _FAIRSEQ_HEADS)
        if name is not None and not ctc:
            out[name] = value
        elif name is None:
            unknown.append(key)
    _fail_unknown(unknown)
    architecture = "Wav2Vec2ForCTC" if ctc else (
        "Wav2Vec2ForPreTraining" if "quantizer.codevectors" in out else "Wav2Vec2Model")
    return out, architecture


_BINOPS = {ast.Add: operator.add, ast.Mult: operator.mul}


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's conv_feature_layers string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4", evaluated safely."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression in conv_feature_layers: {ast.dump(node)}")

    layers = ev(ast.parse(spec, mode="eval"))
    return [tuple(int(v) for v in layer[:3]) for layer in layers]


def _to_plain(obj: Any) -> Any:
    """omegaconf containers / argparse Namespaces -> plain dicts (for unsafely loaded checkpoints)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if hasattr(obj, "__dict__"):
        return {k: _to_plain(v) for k, v in vars(obj).items()}
    return obj


def config_from_fairseq(checkpoint: dict[str, Any], hf_sd: dict[str, Tensor]) -> ModelConfig:
    """ModelConfig from a fairseq checkpoint's ``cfg`` (or old ``args``) plus the weights' shapes."""
    cfg = _to_plain(checkpoint.get("cfg")) or {}
    args = _to_plain(checkpoint.get("args")) or {}
    model = dict(cfg.get("model") or args or {})
    finetune = {}
    w2v_args = model.get("w2v_args")
    if w2v_args:  # a fine-tuned checkpoint: the pretraining model's config sits inside
        finetune = model
        w2v_args = _to_plain(w2v_args)
        model = dict(w2v_args.get("model") or w2v_args)
    criterion = dict(cfg.get("criterion") or {})
    task = dict(cfg.get("task") or {})

    conv_idx = sorted({int(m.group(1)) for k in hf_sd
                       if (m := re.match(r"wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.conv\.weight", k))})
    if not conv_idx:
        raise SpeechSSLError("not a wav2vec 2.0 checkpoint: no conv feature encoder weights found")
    shapes = [hf_sd[f"wav2vec2.feature_extractor.conv_layers.{i}.conv.weight"].shape for i in conv_idx]
    strides = [5, 2, 2, 2, 2, 2, 2]
    if model.get("conv_feature_layers"):
        strides = [s for _, _, s in parse_conv_layers(model["conv_feature_layers"])]
    if len(strides) != len(shapes):
        raise SpeechSSLError("cannot tell the conv strides of this checkpoint (no conv_feature_layers in its cfg)")
    layer_mode = "wav2vec2.feature_extractor.conv_layers.1.layer_norm.weight" in hf_sd
    embed_dim = hf_sd["wav2vec2.feature_projection.projection.weight"].shape[0]
    num_layers = len({k.split(".")[3] for k in hf_sd if k.startswith("wav2vec2.encoder.layers.")})
    pos_v = next(v for k, v in hf_sd.items() if re.search(r"pos_conv_embed\.conv\.(weight_v|.*original1)$", k))
    data: dict[str, Any] = dict(
        conv_channels=[s[0] for s in shapes], conv_kernels=[s[2] for s in shapes], conv_strides=strides,
        conv_bias="wav2vec2.feature_extractor.conv_layers.0.conv.bias" in hf_sd,
        conv_norm="layer" if layer_mode else "group",
        embed_dim=embed_dim, num_layers=num_layers,
        num_heads=model.get("encoder_attention_heads", 16 if embed_dim >= 1024 else 12),
        ffn_dim=hf_sd["wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        layer_norm_first=bool(model.get("layer_norm_first", layer_mode)),
        pos_conv_kernel=pos_v.shape[2], pos_conv_groups=embed_dim // pos_v.shape[1],
        feature_grad_scale=float(model.get("feature_grad_mult", 1.0 if layer_mode else 0.1)),
        normalize_waveform=bool(task.get("normalize", layer_mode)),
    )
    if model.get("activation_fn", "gelu") != "gelu":
        raise SpeechSSLError(f"unsupported fairseq activation_fn {model['activation_fn']!r}")
    if int(model.get("pos_conv_depth", 1)) != 1:
        raise SpeechSSLError("unsupported fairseq pos_conv_depth > 1")
    for ours, theirs in (("dropout", "dropout"), ("attention_dropout", "attention_dropout"),
                         ("activation_dropout", "activation_dropout"), ("dropout_input", "dropout_input"),
                         ("dropout_features", "dropout_features"), ("layerdrop", "encoder_layerdrop"),
                         ("mask_prob", "mask_prob"), ("mask_length", "mask_length"),
                         ("require_same_masks", "require_same_masks"), ("mask_channel_prob", "mask_channel_prob"),
                         ("mask_channel_length", "mask_channel_length"), ("num_negatives", "num_negatives"),
                         ("logit_temp", "logit_temp"), ("final_dim", "final_dim")):
        if model.get(theirs) is not None:
            data[ours] = model[theirs]
    if "quantizer.codevectors" in hf_sd:
        vars_ = hf_sd["quantizer.codevectors"]
        groups = int(model.get("latent_groups", 2))
        entries = hf_sd["quantizer.weight_proj.weight"].shape[0] // groups
        data.update(codebook_groups=groups, codebook_entries=entries, codebook_dim=vars_.shape[-1] * groups,
                    final_dim=hf_sd["project_q.weight"].shape[0])
        if vars_.shape[1] != groups * entries:  # combine_groups: one codebook shared by the groups
            hf_sd["quantizer.codevectors"] = vars_.repeat(1, groups, 1)
    if model.get("latent_temp"):
        tmax, tmin, decay = model["latent_temp"]
        data.update(temperature_max=float(tmax), temperature_min=float(tmin), temperature_decay=float(decay))
    weights = criterion.get("loss_weights")
    if weights:
        data["diversity_weight"] = float(weights[0])
        data["feature_penalty_weight"] = float(weights[1]) if len(weights) > 1 else 0.0
    # Fine-tuning settings of a CTC checkpoint (its own masking, layerdrop and final dropout).
    for ours, theirs in (("mask_prob", "mask_prob"), ("mask_length", "mask_length"),
                         ("mask_channel_prob", "mask_channel_prob"), ("mask_channel_length", "mask_channel_length"),
                         ("layerdrop", "layerdrop"), ("final_dropout", "final_dropout"), ("dropout", "dropout"),
                         ("attention_dropout", "attention_dropout"), ("activation_dropout", "activation_dropout")):
        if finetune.get(theirs) is not None:
            data[ours] = finetune[theirs]
    return make_config(data)


# ----------------------------------------------------------------------------------------------------
# torchaudio
# ----------------------------------------------------------------------------------------------------

def torchaudio_to_hf_keys(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """torchaudio's Wav2Vec2Model state dict -> transformers names (``aux`` is a CTC head)."""
    out = {}
    ctc = any(k.startswith("aux.") for k in sd)
    for key, value in sd.items():
        if key.startswith("encoder.feature_projection."):
            key = "feature_projection." + key[len("encoder.feature_projection."):]
        elif key.startswith("encoder.transformer."):
            key = "encoder." + key[len("encoder.transformer."):]
        elif key.startswith("aux."):
            out["lm_head." + key[len("aux."):]] = value
            continue
        out[("wav2vec2." if ctc else "") + key] = value
    return out, ("Wav2Vec2ForCTC" if ctc else "Wav2Vec2Model")


def hf_to_torchaudio_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers encoder (or ForCTC) names -> torchaudio's Wav2Vec2Model names."""
    out = {}
    for key, value in sd.items():
        key = key[len("wav2vec2."):] if key.startswith("wav2vec2.") else key
        if key == "masked_spec_embed":
            continue  # torchaudio's model has no mask embedding
        if key.startswith("feature_projection."):
            key = "encoder." + key
        elif key.startswith("encoder."):
            key = "encoder.transformer." + key[len("encoder."):]
        elif key.startswith("lm_head."):
            key = "aux." + key[len("lm_head."):]
        out[key] = value
    return out


def config_from_torchaudio(module: Any) -> ModelConfig:
    """ModelConfig of a torchaudio ``Wav2Vec2Model`` instance (read from its modules)."""
    convs = [block.conv for block in module.feature_extractor.conv_layers]
    norm = module.feature_extractor.conv_layers[0].layer_norm
    transformer = module.encoder.transformer
    layer = transformer.layers[0]
    pos = transformer.pos_conv_embed
    return make_config(dict(
        conv_channels=[c.out_channels for c in convs], conv_kernels=[c.kernel_size[0] for c in convs],
        conv_strides=[c.stride[0] for c in convs], conv_bias=convs[0].bias is not None,
        conv_norm="group" if isinstance(norm, torch.nn.GroupNorm) else "layer",
        embed_dim=module.encoder.feature_projection.projection.out_features,
        num_layers=len(transformer.layers), num_heads=layer.attention.num_heads,
        ffn_dim=layer.feed_forward.intermediate_dense.out_features,
        layer_norm_first=bool(layer.layer_norm_first), layer_norm_eps=layer.layer_norm.eps,
        pos_conv_kernel=pos.kernel_size, pos_conv_groups=pos.conv.groups,
        dropout=layer.dropout.p, attention_dropout=layer.attention.dropout,
        activation_dropout=layer.feed_forward.intermediate_dropout.p,
        dropout_input=module.encoder.feature_projection.dropout.p, layerdrop=transformer.layer_drop,
        mask_prob=0.0,
    ))


def config_from_torchaudio_state_dict(sd: dict[str, Tensor]) -> ModelConfig:
    """Best guess from a bare torchaudio state dict: heads = dim / 64 and pre-LN iff layer-norm front end
    (true of every published torchaudio bundle); strides are BASE's."""
    hf_sd, _ = torchaudio_to_hf_keys(sd)
    hf_sd = {k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k: v for k, v in hf_sd.items()}
    n = len({k.split(".")[2] for k in hf_sd if k.startswith("feature_extractor.conv_layers.")})
    shapes = [hf_sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape for i in range(n)]
    if n != 7:
        raise SpeechSSLError("cannot tell the conv strides of a bare torchaudio state dict with "
                             f"{n} conv layers; build the model and use from_torchaudio(module) instead")
    layer_mode = "feature_extractor.conv_layers.1.layer_norm.weight" in hf_sd
    embed_dim = hf_sd["feature_projection.projection.weight"].shape[0]
    pos_v = next(v for k, v in hf_sd.items() if re.search(r"pos_conv_embed\.conv\.(weight_v|.*original1)$", k))
    return make_config(dict(
        conv_channels=[s[0] for s in shapes], conv_kernels=[s[2] for s in shapes],
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in hf_sd,
        conv_norm="layer" if layer_mode else "group", embed_dim=embed_dim,
        num_layers=len({k.split(".")[2] for k in hf_sd if k.startswith("encoder.layers.")}),
        num_heads=max(1, embed_dim // 64), ffn_dim=hf_sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        layer_norm_first=layer_mode, pos_conv_kernel=pos_v.shape[2], pos_conv_groups=embed_dim // pos_v.shape[1],
        feature_grad_scale=1.0 if layer_mode else 0.1, mask_prob=0.0,
    ))
