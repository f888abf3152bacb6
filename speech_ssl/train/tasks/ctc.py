"""CTC fine-tuning (or training from scratch) on labeled audio, scored by WER/CER on a validation set.

The fairseq recipe's behaviours live here: the conv front end frozen throughout, the whole encoder
frozen for the first ``freeze_updates`` (only the head trains), time and channel masking, LayerDrop,
CTC with zero_infinity, the loss normalised by the number of utterances (fairseq's sentence_avg).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from speech_ssl.asr.decoding import greedy_decode
from speech_ssl.asr.scoring import error_counts, rates
from speech_ssl.data import BatchStream, DataConfig, TextNormalizer, Utterance, Vocabulary
from speech_ssl.data.model_inputs import input_steps, model_batch_stream
from speech_ssl.data.read_plan import ReadPlan
from speech_ssl.models.config import ModelConfig, ModelOverrides, resolve_config
from speech_ssl.train.task import StepOutput

log = logging.getLogger(__name__)


# fairseq's fine-tuning values of the model settings (its Wav2Vec2AsrConfig as the published recipes set
# it): fine-tuning applies them as a layer between the model (preset, or pretraining checkpoint) and the
# user's model_overrides, which always win. One key per setting: model_overrides.<name>.
FINETUNE_MODEL_DEFAULTS = ModelOverrides(
    mask_prob=0.65, mask_length=10, mask_channel_prob=0.25, mask_channel_length=64, layerdrop=0.1,
    final_dropout=0.0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.1, dropout_input=0.0,
)


def _finetune_overrides_doc() -> str:
    """FinetuneModelOverrides' docstring: for each setting of the fine-tuning layer, where its value comes
    from (``speech-ssl finetune --help`` shows it beside the key)."""
    import re

    from speech_ssl.models.config import FIELD_DOCS

    lines = ["Model settings changed from the preset or the init checkpoint (null: not set here). Over a",
             "preset or a pretraining checkpoint, the masking and dropout keys left null take the fine-tuning",
             "defaults (fairseq's recipe); a fine-tuned (CTC) init keeps its own; a value given here wins.", ""]
    for name, value in FINETUNE_MODEL_DEFAULTS.given().items():
        match = re.search(rf"^    {name}: (.*?)(?=^    \w[\w /]*: |\Z)", FIELD_DOCS, re.MULTILINE | re.DOTALL)
        what = " ".join(match.group(1).split()) if match else ""
        lines.append(f"{name}: null: {value}, the fine-tuning default (a CTC init keeps its own). {what}")
    return "\n".join(lines)


@dataclass
class FinetuneModelOverrides(ModelOverrides):
    # The docstring is generated below (the fine-tuning defaults written once, in FINETUNE_MODEL_DEFAULTS).
    pass


FinetuneModelOverrides.__doc__ = _finetune_overrides_doc()


def finetune_model_config(base: Union[str, ModelConfig], user: Any = None,
                          base_is_finetuned: bool = False) -> ModelConfig:
    """The model a fine-tuning run trains, resolved in one place (``resolve_config``), in this order, each
    layer winning over the ones before it:

    1. ``base``: the ``model`` preset (init=none), or the config the init checkpoint brings;
    2. FINETUNE_MODEL_DEFAULTS (masking 0.65 x 10, channel masking 0.25 x 64, LayerDrop 0.1, no dropout but
       activation_dropout 0.1), as fairseq's fine-tuning replaces the pretraining values. Skipped when
       ``base_is_finetuned``: a checkpoint that is already a CTC model (ours, a fairseq fine-tuned .pt, a
       transformers Wav2Vec2ForCTC) keeps its own fine-tuning settings;
    3. ``user``: the model_overrides the user (or the recipe) set; a value set there always wins.
    """
    layers = (user,) if base_is_finetuned else (FINETUNE_MODEL_DEFAULTS, user)
    return resolve_config(base, *layers)


def init_model_config(init: str) -> tuple[ModelConfig, bool]:
    """(the ModelConfig, whether it is already a CTC model) of the checkpoint ``init``, without its weights
    where the checkpoint allows (``models.checkpoint.read_model_config``)."""
    from speech_ssl.models.checkpoint import read_model_config

    from speech_ssl import storage

    config, architecture = read_model_config(storage.fetched(init))  # a URI: a local copy, once per node
    return config, architecture.rsplit(":", 1)[-1].split(",")[0] == "Wav2Vec2ForCTC"


@dataclass
class CTCConfig:
    """The fairseq fine-tuning recipe's training behaviour. The model's own settings (masking, LayerDrop,
    dropouts) are model_overrides.* keys, whose fine-tuning defaults are listed there.

    freeze_feature_encoder: keep the pretrained conv front end frozen throughout (ignored with init=none,
        where the front end starts random and must train).
    freeze_updates: train only the CTC head for this many updates, then the whole encoder.
    select_by: the validation metric that picks the ``best`` checkpoint. WER is the published choice; CER
        tells checkpoints apart where nearly every word is still wrong (small models, hard corpora, the CTC
        blank phase), where WER sits at ~100 % for all of them.
    """

    # Keys that were CTCConfig's until issue 19: each setting has one key now (model_overrides.<name>).
    __moved_keys__ = {name: f"model_overrides.{name}" for name in FINETUNE_MODEL_DEFAULTS.given()}

    freeze_feature_encoder: bool = True
    freeze_updates: int = 0
    select_by: str = field(default="valid_wer", metadata={"choices": ["valid_wer", "valid_cer", "valid_loss"]})


def ctc_frames_needed(target: list[int]) -> int:
    """CTC needs a frame per label plus a blank between each pair of repeated labels."""
    return len(target) + sum(1 for a, b in zip(target, target[1:]) if a == b)


@dataclass
class CTCTask:
    """Fine-tune ``init`` (a checkpoint path, or ``"none"``: from scratch) with CTC. ``model_config`` is the
    model to train, resolved by the stage (``finetune_model_config``); with a checkpoint, its weights must
    fit it (the same architecture: only regularisation and masking may differ from the checkpoint's)."""

    init: str
    model_config: ModelConfig
    data: DataConfig
    train: list[Utterance]
    valid: Optional[list[Utterance]]
    vocab: Vocabulary
    ctc: CTCConfig = field(default_factory=CTCConfig)
    read_plan: Optional[ReadPlan] = None  # decode task sizes planned on the driver (speech_ssl.train.launch)

    name = "finetune"
    best_mode = "min"
    progress_keys = ("loss", "lr", "grad_norm", "audio_seconds_per_second", "data_wait_fraction")
    mean_keys = ()
    plot_panels = (
        ("CTC loss (per utterance)", ("loss", "valid_loss")),
        ("error rates", ("valid_wer", "valid_cer")),
        ("learning rate", ("lr",)),
        ("audio s / s / worker", ("audio_seconds_per_second",)),
    )

    @property
    def best_metric(self) -> str:
        return self.ctc.select_by

    def __post_init__(self):
        self.normalizer = TextNormalizer(self.data.text)
        self._streams: dict[str, BatchStream] = {}
        self._model = None
        self._words: Optional[set[str]] = None

    # -- model ---------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        from speech_ssl.models import Wav2Vec2ForCTC, load

        if self.init == "none":
            model = Wav2Vec2ForCTC(self.model_config, len(self.vocab))
        else:
            from speech_ssl import storage

            source = load(storage.fetched(self.init))  # on this worker's node: a URI is downloaded here
            encoder = getattr(source, "encoder", source)
            model = Wav2Vec2ForCTC.from_pretrained_encoder(encoder, len(self.vocab),
                                                           **dataclasses.asdict(self.model_config))
        # Freezing only makes sense for pretrained weights: a from-scratch baseline must train its front end.
        if self.ctc.freeze_feature_encoder and self.init != "none":
            model.freeze_feature_encoder()
        self._model = model
        return model

    def on_update(self, model: torch.nn.Module, updates: int) -> None:
        model.freeze_encoder(updates < self.ctc.freeze_updates)

    def find_unused_parameters(self, model: torch.nn.Module) -> bool:
        return model.config.layerdrop > 0

    def collapse_monitor(self):
        return None

    def extra_files(self) -> dict[str, Any]:
        return {"vocab.json": self.vocab.index, "text_config.json": dataclasses.asdict(self.data.text),
                "lexicon_words.json": sorted(self._training_words())}

    def _training_words(self) -> set[str]:
        if self._words is None:
            self._words = set()
            for utt in self.train:
                if utt.text:
                    self._words.update(self.normalizer(utt.text).split())
        return self._words

    # -- data ----------------------------------------------------------------------------------------
    def _usable(self, utterances: list[Utterance]) -> tuple[list[Utterance], list[tuple[Utterance, str, str]]]:
        """Drop empty transcripts and utterances too short for their transcript under CTC."""
        config = self._model.config
        encoder = self._model.encoder
        keep, dropped = [], []
        for utt in utterances:
            text = self.normalizer(utt.text or "")
            if not text.strip():
                dropped.append((utt, "empty-transcript", "no characters left after normalisation"))
                continue
            steps = input_steps(config, utt.duration)
            frames = int(encoder.output_lengths(torch.tensor([steps]))[0]) if steps > 0 else 0
            needed = ctc_frames_needed(self.vocab.encode(text))
            if frames < needed:
                dropped.append((utt, "too-short-for-transcript",
                                f"{frames} output frames < {needed} needed by CTC for {len(text)} characters"))
                continue
            keep.append(utt)
        return keep, dropped

    def _stream(self, split: str, utterances: list[Utterance], rank: int, world_size: int, seed: int) -> BatchStream:
        if split not in self._streams:
            keep, dropped = self._usable(utterances)
            stream = model_batch_stream(keep, self.data, self._model.config, "pad", rank=rank, world_size=world_size,
                                        seed=seed, vocab=self.vocab, normalizer=self.normalizer,
                                        read_plan=self.read_plan)
            if rank == 0:  # counted once, like the stream's own filtered rows
                for utt, reason, detail in dropped:
                    stream.report.add_filtered(utt.path, reason, detail, utt.id)
                if dropped:
                    reasons = Counter(reason for _, reason, _ in dropped)
                    log.warning("%s data: %d of %d utterances skipped (%s); e.g. %s: %s", split, len(dropped),
                                len(utterances), ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())),
                                dropped[0][0].source_path, dropped[0][2])
            self._streams[split] = stream
        return self._streams[split]

    def train_batches(self, rank: int, world_size: int, seed: int) -> BatchStream:
        return self._stream("train", self.train, rank, world_size, seed)

    def valid_batches(self, rank: int, world_size: int, seed: int) -> Optional[BatchStream]:
        return self._stream("valid", self.valid, rank, world_size, seed) if self.valid else None

    def ingest_reports(self):
        return {split: stream.report for split, stream in self._streams.items()}

    # -- loss and scoring ----------------------------------------------------------------------------
    @staticmethod
    def _forward(model, batch, device):
        return model(batch.inputs.to(device, non_blocking=True), batch.lengths.to(device, non_blocking=True))

    def step(self, model, batch, device) -> StepOutput:
        out = self._forward(model, batch, device)
        loss = out.loss_sum(batch.targets.to(device), batch.target_lengths.to(device))
        return StepOutput(loss, float(len(batch)), {"utterances": float(len(batch))}, batch.audio_seconds)

    def summarize(self, sums: dict[str, float], sample_size: float) -> dict[str, float]:
        return dict(sums)

    def valid_keys(self):
        return ("loss_sum", "utterances", "word_errors", "words", "char_errors", "chars")

    def valid_step(self, model, batch, device) -> dict[str, float]:
        out = self._forward(model, batch, device)
        loss = out.loss_sum(batch.targets.to(device), batch.target_lengths.to(device))
        hyps = [self.vocab.decode(ids) for ids in greedy_decode(out.logits, out.lengths)]
        counts = error_counts([t or "" for t in batch.texts], hyps)
        return {"loss_sum": float(loss), "utterances": float(len(batch)), **{k: counts[k] for k in self.valid_keys()
                                                                          if k in counts and k != "utterances"}}

    def summarize_valid(self, sums: dict[str, float]) -> dict[str, float]:
        if sums.get("utterances", 0.0) <= 0:
            return {}
        r = rates(sums)
        return {"valid_loss": sums["loss_sum"] / sums["utterances"], "valid_wer": r["wer"], "valid_cer": r["cer"]}
