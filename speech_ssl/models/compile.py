"""``torch.compile`` of our models, region by region, each region one whole graph (``fullgraph=True``).

    compile_model(model)      # in place; the state dict keeps its keys; returns the model

The regions are the front end (with the feature LayerNorm), each Transformer layer, and, for
pretraining, the objective (quantizer, projections, distractors, loss): all the model's arithmetic. What
stays eager between them is a handful of small ops and one Python decision per layer: LayerDrop, whose
draw comes from the CPU generator. Compiling each layer on its own keeps LayerDrop's semantics (a dropped
layer is skipped: no work, no gradient, as in fairseq) without a graph break or a read from the device,
compiles one layer graph for all layers instead of twelve, and is what PyTorch recommends for stacks of
identical blocks ("regional compilation"). ``fullgraph=True`` makes any graph break in a region an error,
so none can creep in unnoticed (tests/test_models_compile.py).

Shapes vary from batch to batch (utterance lengths, batch size): the regions are compiled with dynamic
shapes, so a new length does not recompile.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from speech_ssl.models.wav2vec2 import Wav2Vec2ForPreTraining, Wav2Vec2Model


def _encoder(model: nn.Module) -> Optional[Wav2Vec2Model]:
    if isinstance(model, Wav2Vec2Model):
        return model
    encoder = getattr(model, "encoder", None)
    return encoder if isinstance(encoder, Wav2Vec2Model) else None


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """Compile ``model``'s regions in place (any of our model classes; another module is compiled whole);
    ``options`` go to torch.compile.

    Idempotent. Parameters, buffers and state-dict keys are unchanged, so checkpoints, DDP and the
    optimizer see the same model.
    """
    if getattr(model, "_speech_ssl_compiled", False):
        return model
    encoder = _encoder(model)
    if encoder is None:  # not one of ours (a task's own model): torch.compile as a whole, breaks allowed
        model.compile(**{"dynamic": True, **options})
        model._speech_ssl_compiled = True
        return model
    options = {"fullgraph": True, "dynamic": True, **options}
    encoder.feature_encoder.compile(**options)
    encoder.feature_norm.compile(**options)
    for layer in encoder.context.layers:
        layer.compile(**options)
    if isinstance(model, Wav2Vec2ForPreTraining):
        model.compiled_objective = torch.compile(model._objective, **options)
    model._speech_ssl_compiled = True
    return model
