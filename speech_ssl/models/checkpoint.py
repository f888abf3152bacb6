"""Checkpoint I/O: our format, and import / export of transformers, fairseq and torchaudio models.

Our format is a directory: ``config.json`` (``{"format": "speech-ssl", "format_version": 1,
"architecture": <class name>, "model": <ModelConfig fields>, ...}``) and ``model.safetensors``. Never a
pickle. ``load(path)`` recognises, in order: our directory, a transformers directory (``config.json``
with ``model_type: wav2vec2`` and safetensors or ``pytorch_model.bin`` weights), a fairseq ``.pt`` file
(or a bare torchaudio state dict saved with ``torch.save``).

fairseq checkpoints are pickles that usually hold an omegaconf config, which ``torch.load`` will not
read with ``weights_only=True``. We try the safe load first and otherwise stop with a message saying how
to allow the unsafe load (``allow_unsafe_pickle=True`` or ``SPEECH_SSL_ALLOW_UNSAFE_PICKLE=1``), which
can run arbitrary code from the file: only for files you trust.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from speech_ssl.config import ConfigError, from_dict
from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import convert
from speech_ssl.models.config import ModelConfig
from speech_ssl.models.ctc import Wav2Vec2ForCTC
from speech_ssl.models.wav2vec2 import Wav2Vec2ForPreTraining, Wav2Vec2Model

FORMAT = "speech-ssl"
FORMAT_VERSION = 1
UNSAFE_ENV = "SPEECH_SSL_ALLOW_UNSAFE_PICKLE"
AnyModel = Union[Wav2Vec2ForPreTraining, Wav2Vec2ForCTC, Wav2Vec2Model]
ARCHITECTURES = ("Wav2Vec2ForPreTraining", "Wav2Vec2ForCTC", "Wav2Vec2Model")


def _safetensors():
    """safetensors.torch, imported when weights are read or written (``import speech_ssl.models`` needs torch
    only: a GPU machine may lack safetensors)."""
    try:
        import safetensors.torch
    except ModuleNotFoundError as err:
        raise SpeechSSLError(f"reading or writing model.safetensors needs the safetensors package ({err}); "
                             "pip install safetensors") from None
    return safetensors.torch


def load_file(path: str) -> dict[str, torch.Tensor]:
    return _safetensors().load_file(path)


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux); else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors' save_file, with the permissions of any other file we write: safetensors creates its
    files 0600, which hides checkpoints and exports from the rest of a group or a serving user."""
    _safetensors().save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _architecture(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise TypeError(f"not a speech_ssl wav2vec 2.0 model: {name}")
    return name


def _instantiate(architecture: str, cfg: ModelConfig, vocab_size: Optional[int]) -> AnyModel:
    if architecture == "Wav2Vec2ForCTC":
        if not vocab_size:
            raise SpeechSSLError("a CTC checkpoint without its vocabulary size")
        return Wav2Vec2ForCTC(cfg, vocab_size)
    if architecture == "Wav2Vec2ForPreTraining":
        return Wav2Vec2ForPreTraining(cfg)
    if architecture == "Wav2Vec2Model":
        return Wav2Vec2Model(cfg)
    raise SpeechSSLError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")


def _load_weights(model: AnyModel, state: dict[str, torch.Tensor], source: str, strict: bool = False) -> AnyModel:
    own = model.state_dict()
    # A checkpoint from elsewhere may lack what only we keep (the temperature buffer, a mask
    # embedding of a model that never masked): those keep their initial values.
    optional = set() if strict else {"quantizer.temperature", "mask_embedding", "encoder.mask_embedding"}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise SpeechSSLError(f"{source}: weights do not fit the model (missing: {missing[:6]}, "
                             f"unexpected: {unexpected[:6]})")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise SpeechSSLError(f"{source}: weight {key} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(own[key].shape)}")
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------------------------------
# our format
# ----------------------------------------------------------------------------------------------------

def save_model(model: nn.Module, directory: Union[str, Path], vocab: Optional[dict[str, int]] = None,
               extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``vocab.json`` when given) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = _architecture(model)
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": architecture,
                            "model": asdict(model.config)}
    if isinstance(model, Wav2Vec2ForCTC):
        meta["vocab_size"] = model.vocab_size
    if extra:
        meta.update(extra)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    if vocab is not None:
        (directory / "vocab.json").write_text(json.dumps(vocab, indent=2, ensure_ascii=False) + "\n")
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _load_ours(directory: Path, meta: dict[str, Any]) -> AnyModel:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SpeechSSLError(f"{directory}: checkpoint format version {version!r} is newer than this speech-ssl "
                             f"reads ({FORMAT_VERSION}); upgrade speech-ssl")
    try:
        cfg = from_dict(ModelConfig, meta.get("model") or {}, "model")
    except ConfigError as err:
        raise SpeechSSLError(f"{directory}/config.json: {err.paragraph()}") from None
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise SpeechSSLError(f"{directory}: model.safetensors is missing")
    model = _instantiate(meta.get("architecture", ""), cfg, meta.get("vocab_size"))
    return _load_weights(model, load_file(str(weights)), str(directory), strict=True)


# ----------------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------------

def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(directory / name)))
        return state
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise SpeechSSLError(f"{binary}: cannot be read safely ({err})") from None
    raise SpeechSSLError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _load_hf(directory: Path, hf_config: dict[str, Any]) -> AnyModel:
    cfg = convert.config_from_hf(hf_config)
    hf_state = _read_hf_weights(directory)
    architecture = convert.detect_architecture(list(hf_state))
    vocab_size = hf_config.get("vocab_size") if architecture == "Wav2Vec2ForCTC" else None
    if vocab_size is None and architecture == "Wav2Vec2ForCTC":
        vocab_size = hf_state["lm_head.weight"].shape[0]
    if architecture == "Wav2Vec2Model":
        # A transformers head we do not have (classification...): keep the encoder only.
        hf_state = {k: v for k, v in hf_state.items() if k.startswith("wav2vec2.")} or hf_state
    state = convert.from_hf_state_dict(hf_state, architecture)
    return _load_weights(_instantiate(architecture, cfg, vocab_size), state, str(directory))


def export_hf(model: nn.Module, directory: Union[str, Path], vocab: Optional[dict[str, int]] = None) -> Path:
    """Write the transformers layout (config.json + model.safetensors) that ``from_pretrained`` loads.

    For a CTC model with ``vocab`` also the processor files (vocab.json, tokenizer_config.json,
    special_tokens_map.json), so ``transformers.Wav2Vec2Processor.from_pretrained(directory)`` works.
    ``preprocessor_config.json`` is always written (feature extractor: 16 kHz, normalisation as trained).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = _architecture(model)
    cfg: ModelConfig = model.config
    vocab_size = model.vocab_size if isinstance(model, Wav2Vec2ForCTC) else None
    if vocab is not None:
        if vocab_size is not None and len(vocab) != vocab_size:
            raise SpeechSSLError(f"the vocabulary has {len(vocab)} symbols but the CTC head {vocab_size}")
        if vocab.get("<pad>") != 0:
            raise SpeechSSLError("the vocabulary must map '<pad>' (the CTC blank) to 0")
    hf_config = convert.config_to_hf(cfg, architecture, vocab_size)
    state = convert.to_hf_state_dict(model.state_dict(), architecture)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    feature_extractor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": cfg.sample_rate,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": cfg.normalize_waveform,
        # transformers' convention: group-norm models are run without an attention mask
        "return_attention_mask": cfg.conv_norm == "layer",
    }
    if vocab is not None:
        feature_extractor["processor_class"] = "Wav2Vec2Processor"
        word_delimiter = "|" if "|" in vocab else None
        (directory / "vocab.json").write_text(json.dumps(vocab, indent=2, ensure_ascii=False) + "\n")
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        tokenizer = {"tokenizer_class": "Wav2Vec2CTCTokenizer", "processor_class": "Wav2Vec2Processor",
                     **specials, "word_delimiter_token": word_delimiter, "replace_word_delimiter_char": " ",
                     "do_lower_case": False, "target_lang": None,
                     # transformers' English clean-up would glue " 's" and " ' " to the previous word; our
                     # greedy decoder spells the tokens as they are (speech_ssl.data.text.Vocabulary.decode).
                     "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (directory / "preprocessor_config.json").write_text(json.dumps(feature_extractor, indent=2) + "\n")
    return directory


# ----------------------------------------------------------------------------------------------------
# fairseq and torchaudio files
# ----------------------------------------------------------------------------------------------------

def _torch_load_checked(path: Path, allow_unsafe_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        allowed = allow_unsafe_pickle or os.environ.get(UNSAFE_ENV, "") not in ("", "0", "false", "False")
        if not allowed:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SpeechSSLError(
                f"{path} is a pickle that cannot be loaded safely (torch.load(weights_only=True) refused it: "
                f"{first_line}). fairseq checkpoints usually need this because they store their config as "
                "Python objects. Loading it unsafely can run arbitrary code from the file, so do it only for "
                f"a file you trust: pass allow_unsafe_pickle=True to speech_ssl.models.load, or set "
                f"{UNSAFE_ENV}=1 in the environment.") from None
        return torch.load(path, map_location="cpu", weights_only=False)


def _load_file(path: Path, allow_unsafe_pickle: bool) -> AnyModel:
    blob = _torch_load_checked(path, allow_unsafe_pickle)
    if isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        hf_state, architecture = convert.fairseq_to_hf_keys(blob["model"])
        cfg = convert.config_from_fairseq(blob, hf_state)
        vocab_size = hf_state["lm_head.weight"].shape[0] if architecture == "Wav2Vec2ForCTC" else None
        state = convert.from_hf_state_dict(hf_state, architecture)
        return _load_weights(_instantiate(architecture, cfg, vocab_size), state, str(path))
    if isinstance(blob, dict) and any(k.startswith("encoder.transformer.") for k in blob):
        return from_torchaudio(blob)
    raise SpeechSSLError(f"{path}: not a fairseq wav2vec 2.0 checkpoint (a dict with 'model' weights) nor a "
                         "torchaudio Wav2Vec2Model state dict")


def from_torchaudio(module_or_state: Any, config: Optional[ModelConfig] = None) -> Union[Wav2Vec2Model, Wav2Vec2ForCTC]:
    """Our model from a torchaudio ``Wav2Vec2Model`` (config read from its modules) or its state dict
    (config guessed from shapes unless given). A torchaudio ``aux`` head becomes a CTC head."""
    if isinstance(module_or_state, nn.Module):
        cfg = config or convert.config_from_torchaudio(module_or_state)
        state = module_or_state.state_dict()
    else:
        state = module_or_state
        cfg = config or convert.config_from_torchaudio_state_dict(state)
    hf_state, architecture = convert.torchaudio_to_hf_keys(state)
    vocab_size = hf_state["lm_head.weight"].shape[0] if architecture == "Wav2Vec2ForCTC" else None
    ours = convert.from_hf_state_dict(hf_state, architecture)
    return _load_weights(_instantiate(architecture, cfg, vocab_size), ours, "torchaudio model")


def to_torchaudio_state_dict(model: Union[Wav2Vec2Model, Wav2Vec2ForCTC]) -> dict[str, torch.Tensor]:
    """Weights for torchaudio's ``wav2vec2_model(...)`` of the same configuration (``aux`` for CTC)."""
    architecture = _architecture(model)
    if architecture == "Wav2Vec2ForPreTraining":
        architecture, model = "Wav2Vec2Model", model.encoder
    return convert.hf_to_torchaudio_keys(convert.to_hf_state_dict(model.state_dict(), architecture))


# ----------------------------------------------------------------------------------------------------
# one entry point
# ----------------------------------------------------------------------------------------------------

def read_model_config(checkpoint: str):
    """(ModelConfig, architecture) of a checkpoint: from config.json for our and transformers
    directories (no weights read), else by loading the file. Raises SpeechSSLError."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise SpeechSSLError(f"no checkpoint at {checkpoint} (give one of our checkpoint directories, a "
                             "transformers model directory, or a fairseq .pt file)")
    config_json = path / "config.json"
    if path.is_dir() and config_json.is_file():
        try:
            meta = json.loads(config_json.read_text())
        except json.JSONDecodeError as err:
            raise SpeechSSLError(f"{config_json}: not valid JSON ({err})") from None
        if meta.get("format") == FORMAT:
            try:
                return from_dict(ModelConfig, meta.get("model") or {}, "model"), meta.get("architecture", "?")
            except ConfigError as err:
                raise SpeechSSLError(f"{config_json}: {err.paragraph()}") from None
        if meta.get("model_type") is not None:
            return convert.config_from_hf(meta), "transformers:" + ",".join(meta.get("architectures") or ["?"])
    model = load(path)
    return model.config, type(model).__name__


def load(path: Union[str, Path], allow_unsafe_pickle: bool = False) -> AnyModel:
    """Load a model by auto-detection: our checkpoint directory, a transformers directory, a fairseq .pt."""
    path = Path(path)
    if not path.exists():
        raise SpeechSSLError(f"no checkpoint at {path}")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise SpeechSSLError(f"{path}: not a checkpoint directory (no config.json)")
        try:
            meta = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise SpeechSSLError(f"{config_path}: not valid JSON ({err})") from None
        if meta.get("format") == FORMAT:
            return _load_ours(path, meta)
        if meta.get("model_type") is not None:
            return _load_hf(path, meta)
        raise SpeechSSLError(f"{path}: config.json is neither a speech-ssl checkpoint nor a transformers model")
    return _load_file(path, allow_unsafe_pickle)
