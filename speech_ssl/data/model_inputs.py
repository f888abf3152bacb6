"""What a model reads, said once: the seam between a model's configuration and the data pipeline.

Training (pretraining, CTC fine-tuning), recognition, probing, embedding and the stages that check caches
all ask the same questions of a model: which features its front end reads (``feature_spec_for``), how many
input steps some audio is (``input_steps``), how many output frames per second it makes (``frame_rate``),
how much audio one output frame needs (``receptive_field_seconds``), and, for the callers that read a
corpus through it, its batches (``model_batch_stream``, the one place a model's ``BatchStream`` is built).

``model_config`` is duck-typed (a ``speech_ssl.models.config.ModelConfig``, or anything with its
``frontend``, ``n_mels``, ``sample_rate``, ``normalize_waveform``, ``conv_kernels``, ``conv_strides`` and
``frame_stride``), so that the data layer does not import the models, nor torch, to answer these.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Sequence

from speech_ssl.data.audio import FeatureSpec

if TYPE_CHECKING:
    from speech_ssl.data.config import DataConfig
    from speech_ssl.data.read_plan import ReadPlan
    from speech_ssl.data.sources import Utterance
    from speech_ssl.data.stream import BatchStream
    from speech_ssl.data.text import TextNormalizer, Vocabulary


def feature_spec_for(model_config: Any, sample_rate: Optional[int] = None) -> FeatureSpec:
    """What the data pipeline must produce for a model: waveform for the conv front end (normalised per
    utterance when the model says so), or log-mel filterbanks for the fbank front end.

    sample_rate: of the produced features (Hz); None: the model's own ``sample_rate``."""
    rate = model_config.sample_rate if sample_rate is None else sample_rate
    if model_config.frontend == "fbank":
        return FeatureSpec(kind="fbank", sample_rate=rate, n_mels=model_config.n_mels, normalize=True)
    return FeatureSpec(kind="waveform", sample_rate=rate, normalize=bool(model_config.normalize_waveform))


def input_steps(model_config: Any, seconds: float) -> int:
    """Length of ``seconds`` of audio on the model's input time axis: samples at its rate, or filterbank
    frames (the pipeline's framing, so that it counts what the batches will hold)."""
    samples = int(round(seconds * model_config.sample_rate))
    return feature_spec_for(model_config).num_steps(samples)


def frame_rate(model_config: Any) -> float:
    """Output frames per second of audio (50.0 for wav2vec 2.0's conv front end: 320 samples at 16 kHz,
    20 ms frames)."""
    spec = feature_spec_for(model_config)
    steps_per_second = spec.sample_rate if spec.kind == "waveform" else 1000.0 / spec.frame_shift_ms
    return steps_per_second / model_config.frame_stride


def receptive_field_seconds(model_config: Any, spec: FeatureSpec) -> float:
    """Shortest audio (seconds) that yields one output frame when read as ``spec`` (25 ms for wav2vec 2.0's
    conv front end at 16 kHz: 400 samples)."""
    steps = 1
    for kernel, stride in zip(reversed(model_config.conv_kernels), reversed(model_config.conv_strides)):
        steps = (steps - 1) * stride + kernel
    if spec.kind == "fbank":
        return ((steps - 1) * spec.frame_shift + spec.frame_length) / spec.sample_rate
    return steps / spec.sample_rate


def inference_data(data: DataConfig, model_config: Any) -> DataConfig:
    """``data`` as a trained model reads a corpus (recognition, probing): resampled to the rate the model
    was trained at (``data.sample_rate`` is set aside), in length order (no shuffling)."""
    return dataclasses.replace(data, sample_rate=model_config.sample_rate, shuffle=False)


def model_batch_stream(utterances: Sequence[Utterance], data: DataConfig, model_config: Any, mode: str, *,
                       rank: int = 0, world_size: int = 1, seed: int = 0, use_ray: Optional[bool] = None,
                       vocab: Optional[Vocabulary] = None, normalizer: Optional[TextNormalizer] = None,
                       read_plan: Optional[ReadPlan] = None) -> BatchStream:
    """This rank's batches of ``utterances`` as ``model_config``'s front end reads them, at
    ``data.sample_rate`` (see :class:`~speech_ssl.data.stream.BatchStream` for mode, rank, vocab, ...).

    use_ray: decode on Ray Data CPU tasks; None: when this process is connected to Ray (a Ray Train worker
    is; in-process training and tests are not)."""
    from speech_ssl.data.stream import BatchStream

    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    return BatchStream(utterances, data, feature_spec_for(model_config, data.sample_rate), mode, rank=rank,
                       world_size=world_size, seed=seed, use_ray=use_ray, vocab=vocab, normalizer=normalizer,
                       read_plan=read_plan)
