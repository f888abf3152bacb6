"""``speech_ssl.models.compile.compile_model``: whole graphs (``fullgraph=True``: a graph break is an
error), the same numbers and gradients as eager, no recompilation for new shapes, checkpoints unchanged.

Compiling on a 2-core CPU takes a while, so one module-scoped compiled model serves every test here.
Inductor draws random numbers its own way; ``fallback_random`` makes it use eager's generator so that the
Gumbel noise and the distractors of both runs are the same draws, and LayerDrop's draws are Python's in
both. Dropout masks still come out differently under compile (and our CPU kernels draw theirs their own
way), so the exact comparison runs without dropout and a second model checks that dropout is live.
"""

from __future__ import annotations

import pytest
import torch

from speech_ssl.models import build
from speech_ssl.models.compile import compile_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
GROUP_NORM = dict(conv_norm="group", conv_bias=False, layer_norm_first=False, normalize_waveform=False)
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0, dropout_features=0.0)


def waves(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    x = torch.zeros(len(lengths), width)
    for b, n in enumerate(lengths):
        x[b, :n] = 0.3 * torch.randn(n, generator=g)
    return x, torch.tensor(lengths)


@pytest.fixture(scope="module")
def models():
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    # LayerDrop stays an eager Python decision between compiled layers: keep it, and drop dropout (above)
    eager = build("tiny", layerdrop=0.5, **NO_DROPOUT)
    compiled = build("tiny", layerdrop=0.5, **NO_DROPOUT)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    previous = inductor_config.fallback_random
    inductor_config.fallback_random = True
    yield eager, compiled
    inductor_config.fallback_random = previous


def run(model, x, lengths, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, lengths)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_compiled_training_step_matches_eager_with_no_graph_break_or_recompile(models):
    from torch._dynamo.utils import counters

    eager, compiled = models
    eager.train(), compiled.train()
    graphs = None
    for k, lengths in enumerate([[16000, 12000], [14000, 9000, 11000], [20000, 15000]]):
        x, lens = waves(lengths, seed=k)
        ref, ref_grads = run(eager, x, lens, seed=100 + k)
        got, got_grads = run(compiled, x, lens, seed=100 + k)
        assert torch.equal(ref.mask_time, got.mask_time)
        loss, got_loss = float(ref.loss.detach()), float(got.loss.detach())
        assert abs(loss - got_loss) < 1e-4 * max(1.0, abs(loss)), (k, loss, got_loss)
        assert ref.logs.keys() == got.logs.keys()
        for key in ("contrastive", "correct", "count", "code_perplexity"):
            assert abs(ref.logs[key] - got.logs[key]) <= 1e-3 * max(1.0, abs(ref.logs[key])), key
        assert ref_grads.keys() == got_grads.keys()
        for name, g in ref_grads.items():
            scale = g.abs().max().clamp(min=1e-6)
            assert (got_grads[name] - g).abs().max() / scale < 1e-3, name
        if k == 1:  # the first two batches may compile the static then the dynamic version of each region
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch shape recompiled a region"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_model_keeps_its_state_dict_keys(models):
    eager, compiled = models
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert compile_model(compiled) is compiled  # idempotent


def test_compiled_group_norm_model_matches_eager_and_keeps_dropout_live(models):
    """The BASE-style front end (group norm, no conv bias: ChannelNormOverTime under compile): in eval mode
    it matches eager, loss and gradients; in training mode dropout is live (two seeds, two losses)."""
    torch.manual_seed(1)
    eager = build("tiny", **GROUP_NORM)
    compiled = build("tiny", **GROUP_NORM)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    x, lens = waves([16000, 12000], seed=9)
    eager.eval(), compiled.eval()
    ref, ref_grads = run(eager, x, lens, seed=3)
    got, got_grads = run(compiled, x, lens, seed=3)
    loss, got_loss = float(ref.loss.detach()), float(got.loss.detach())
    assert abs(loss - got_loss) < 1e-4 * max(1.0, abs(loss)), (loss, got_loss)
    for name, g in ref_grads.items():
        assert (got_grads[name] - g).abs().max() / g.abs().max().clamp(min=1e-6) < 1e-3, name
    compiled.train()
    torch.manual_seed(1)
    first = float(compiled(x, lens).loss.detach())
    torch.manual_seed(2)
    second = float(compiled(x, lens).loss.detach())
    assert first != second and all(abs(v) < 1e3 for v in (first, second))
