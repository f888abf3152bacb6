"""Linear probes on frozen features: how much a representation knows, measured the standard way.

Pure PyTorch (no Ray, no Hydra), used by ``speech-ssl probe`` (:mod:`speech_ssl.stages.probe`) and by the
pretraining loop's periodic monitor (:class:`ProbeMonitor`, ``pretrain probe.every_updates``).

* ``speaker``: each utterance's features, mean-pooled over its valid frames -> one linear layer -> softmax
  over the speakers of the training manifest (``speaker`` field). Reports train/valid accuracy and the chance
  level (the share of the validation set that the most frequent training speaker holds, and 1 / speakers).
* ``ctc``: frame-level features -> one linear layer -> CTC over the characters of the training transcripts
  (the project's TextNormalizer and Vocabulary, blank 0). Reports the validation CER/WER of greedy decoding.
* ``classify``: a manifest column (``label_key``) from mean-pooled features with k labeled examples per
  class, several random draws, against a random-initial model and mean log-mel filterbanks on the same draws
  (:mod:`speech_ssl.probe.fewshot`).

The features are every hidden state mixed by learned softmax weights (``layer=all``, SUPERB's protocol;
:class:`~speech_ssl.probe.heads.LayerMix`) or one layer (``layer=<i>``, transformers' ``hidden_states``
numbering, -1 the last). They come from :class:`speech_ssl.embed.Embedder` (eval mode, no gradients), are
computed once and kept in memory; the head is then trained with AdamW for a fixed number of epochs.
Everything random (holdout split, subsampling, draws, initialisation, batch order) comes from ``seed``
through private generators, so a probe is deterministic and never touches the caller's RNG streams.

Modules: ``settings`` (what is asked), ``splits`` (rows, labels, draws), ``features`` (frozen features),
``heads`` (layer mix and linear heads), ``tasks`` (one probe end to end), ``fewshot`` (classify),
``plots``, ``monitor`` (during pretraining).
"""

from speech_ssl.probe.features import Features, extract, frozen, model_batches
from speech_ssl.probe.heads import LayerMix, ctc_frames_needed, fit_classifier, fit_ctc
from speech_ssl.probe.monitor import ProbeMonitor
from speech_ssl.probe.settings import TASKS, ProbeSettings, check_settings, is_none, layer_index
from speech_ssl.probe.splits import ProbeData, few_shot_draw, holdout_split, prepare_splits, subsample
from speech_ssl.probe.tasks import run_probe, summary_line

__all__ = ["Features", "LayerMix", "ProbeData", "ProbeMonitor", "ProbeSettings", "TASKS", "check_settings",
           "ctc_frames_needed", "extract", "few_shot_draw", "fit_classifier", "fit_ctc", "frozen", "holdout_split",
           "is_none", "layer_index", "model_batches", "prepare_splits", "run_probe", "subsample", "summary_line"]
