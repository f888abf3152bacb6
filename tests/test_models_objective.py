"""The pretraining objective's semantics: masking, distractors, the loss and its parts, gradients, RNG."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from speech_ssl.models import build
from speech_ssl.models.masking import compute_span_mask
from speech_ssl.models.quantizer import GumbelQuantizer
from speech_ssl.models.wav2vec2 import masked_frame_table, sample_negatives


def waves(batch=2, samples=16000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, samples, generator=g)


# ---------------------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------------------

def test_span_count_with_unit_spans_is_probabilistic_rounding():
    """With span length 1 nothing overlaps, so each row masks exactly max(min, int(p*len + U)) frames."""
    torch.manual_seed(0)
    lengths = torch.tensor([100, 37, 5, 64])
    for _ in range(20):
        mask = compute_span_mask((4, 100), lengths, 0.3, 1, min_masks=2, require_same_masks=False)
        counts = mask.sum(1)
        expected_low = torch.clamp(torch.floor(0.3 * lengths.double()).long(), min=2)
        assert ((counts == expected_low) | (counts == expected_low + 1)).all(), counts
        assert not (mask & (torch.arange(100)[None] >= lengths[:, None])).any()  # never padding


def test_span_mask_fraction_min_masks_and_same_count():
    torch.manual_seed(1)
    mask = compute_span_mask((64, 500), None, 0.65, 10, min_masks=2, require_same_masks=False)
    fraction = mask.float().mean().item()
    # fairseq's rule masks 1 - (1 - 0.065)^10 ~ 49% of frames (overlapping spans merge)
    assert 0.45 < fraction < 0.53
    # short rows still get min_masks spans' worth; padding never masked; equal counts when required
    lengths = torch.tensor([300, 120, 25, 12])
    mask = compute_span_mask((4, 300), lengths, 0.65, 10, min_masks=2, require_same_masks=True)
    counts = mask.sum(1)
    assert (counts == counts[0]).all() and counts[0] >= 10
    assert not (mask & (torch.arange(300)[None] >= lengths[:, None])).any()


def test_pretraining_masks_follow_the_config():
    torch.manual_seed(2)
    model = build("tiny", mask_prob=0.5, mask_length=5)
    lengths = torch.tensor([16000, 11000])
    out = model(waves(), lengths)
    mask = out.mask_time
    assert mask.shape == (2, 49)
    counts = mask.sum(1)
    assert counts[0] == counts[1] == out.sample_size // 2  # require_same_masks
    assert out.sample_size == out.logs["num_masked"] == out.logs["count"]
    valid = model.encoder.output_lengths(lengths)
    assert out.logs["num_frames"] == float(valid.sum())
    assert not (mask & (torch.arange(49)[None] >= valid[:, None])).any()


# ---------------------------------------------------------------------------------------------------
# distractors
# ---------------------------------------------------------------------------------------------------

def test_distractors_never_the_positive_and_stay_in_the_utterance():
    torch.manual_seed(3)
    time = 40
    mask = torch.zeros(4, time, dtype=torch.bool)
    chosen = [torch.randperm(time)[:c] for c in (7, 1, 30, 2)]  # scattered masked frames
    for b, frames in enumerate(chosen):
        mask[b, frames] = True
    neg = sample_negatives(mask, 200)  # [B, T, K] frame indices
    assert neg.shape == (4, time, 200)
    for b, frames in enumerate(chosen):
        masked = set(frames.tolist())
        for t in frames.tolist():
            drawn = set(neg[b, t].tolist())
            assert drawn <= masked  # only masked frames of the same utterance, never padding
            if len(masked) > 1:  # uniform over the *other* masked frames: each of them gets drawn
                assert t not in drawn
                if b == 2:
                    assert drawn == masked - {t}


def test_masked_frame_table_ranks_and_locates_the_masked_frames():
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    counts, rank, frame_of = masked_frame_table(mask)
    assert counts.tolist() == [3, 0, 2]
    assert rank[mask].tolist() == [0, 1, 2, 0, 1]
    assert frame_of[0, :3].tolist() == [1, 2, 4] and frame_of[2, :2].tolist() == [0, 4]


def test_objective_has_fixed_shapes_and_reads_nothing_back():
    """The objective scores every frame and weights by the mask: its logits cover [B, T, K+1], the
    masked rows are what fairseq's gather would give, and no tensor is read back to the host (a step
    can be queued and compiled whole)."""
    torch.manual_seed(6)
    model = build("tiny")
    x = waves(3, 16000)
    feats = model.encoder.extract_features(x)
    mask = model.encoder.compute_time_mask(feats)
    enc = model.encoder.contextualize(feats, mask)
    original = torch.Tensor.item
    def refuse(*args, **kwargs):
        raise AssertionError("the objective read a tensor back to the host")
    torch.Tensor.item = refuse
    try:
        loss_sum, num_masked, frame_logits, stats = model._objective(
            enc.last_hidden_state, feats.features, mask, feats.feature_penalty, feats.lengths)
    finally:
        torch.Tensor.item = original
    assert frame_logits.shape[:2] == mask.shape
    assert int(num_masked) == int(mask.sum())
    per_frame = torch.logsumexp(frame_logits, -1) - frame_logits[..., 0]
    assert torch.allclose(per_frame[mask].sum(), stats["contrastive"], rtol=1e-5)


def test_objective_ignores_non_finite_unmasked_frames():
    """A NaN in a frame that is neither masked nor a distractor (e.g. garbage in padding) must not reach
    the loss or the gradients: unmasked frames are selected out, not multiplied by zero."""
    torch.manual_seed(7)
    model = build("tiny")
    feats = model.encoder.extract_features(waves(2, 16000))
    mask = model.encoder.compute_time_mask(feats)
    enc = model.encoder.contextualize(feats, mask)
    hidden = enc.last_hidden_state.detach().clone().requires_grad_(True)
    unmasked = (~mask).nonzero()[0]
    poisoned = hidden.detach().clone()
    poisoned[unmasked[0], unmasked[1]] = float("nan")
    poisoned.requires_grad_(True)
    loss, *_ = model._objective(poisoned, feats.features.detach(), mask, feats.feature_penalty.detach(),
                                feats.lengths)
    loss.backward()
    assert torch.isfinite(loss)
    grad = poisoned.grad
    assert torch.isfinite(grad[mask]).all()


def test_identical_codeword_distractors_are_masked_out():
    torch.manual_seed(4)
    model = build("tiny").eval()
    with torch.no_grad():  # every frame picks entry 0 in every group: all distractors share the codeword
        model.quantizer.logits_proj.bias.zero_()
        model.quantizer.logits_proj.bias[0::model.config.codebook_entries] = 1e4
        out = model(waves())
    assert torch.isinf(out.logits[:, 1:]).all() and torch.isfinite(out.logits[:, 0]).all()
    assert out.logs["contrastive"] == 0.0


def test_random_init_loss_sits_near_chance():
    torch.manual_seed(5)
    model = build("tiny")
    out = model(waves(2, 32000))
    per_frame = out.logs["contrastive"] / out.sample_size
    chance = math.log(model.config.num_negatives + 1)
    assert abs(per_frame - chance) < 0.15 * chance
    total = out.logs["contrastive"] + out.logs["diversity_sum"] + out.logs["feature_penalty_sum"]
    assert 0 <= out.logs["diversity"] <= 1
    assert abs(float(out.loss_sum.detach()) - total) < 1e-3 * total
    assert abs(float(out.loss.detach()) - float(out.loss_sum.detach()) / out.sample_size) < 1e-6


def test_logits_are_fp32_cosines_over_kappa():
    torch.manual_seed(6)
    model = build("tiny")
    out = model(waves())
    assert out.logits.dtype == torch.float32
    finite = out.logits[torch.isfinite(out.logits)]
    assert finite.abs().max() <= 1.0 / model.config.logit_temp + 1e-4


# ---------------------------------------------------------------------------------------------------
# quantizer, diversity, temperature
# ---------------------------------------------------------------------------------------------------

def test_diversity_is_zero_for_uniform_codebook_use():
    q = GumbelQuantizer(in_dim=16, groups=2, entries=8, codebook_dim=8)
    with torch.no_grad():
        q.logits_proj.weight.zero_()
        q.logits_proj.bias.zero_()
    out = q(torch.randn(50, 16))
    assert abs(float(out.prob_perplexity) - 16.0) < 1e-4
    assert abs(float(out.diversity)) < 1e-5
    with torch.no_grad():
        q.logits_proj.bias[0] = 20.0  # group 0 collapses onto one entry
    out = q(torch.randn(50, 16))
    assert float(out.diversity) > 0.4


def test_temperature_schedule_lives_in_the_state_dict():
    model = build("tiny")
    cfg = model.config
    assert "quantizer.temperature" in model.state_dict()
    model.set_num_updates(100_000)
    expected = max(cfg.temperature_max * cfg.temperature_decay ** 100_000, cfg.temperature_min)
    assert abs(model.temperature - expected) < 1e-6
    model.set_num_updates(10_000_000)
    assert model.temperature == pytest.approx(cfg.temperature_min)
    other = build("tiny")
    other.load_state_dict(model.state_dict())
    assert other.temperature == pytest.approx(cfg.temperature_min)


# ---------------------------------------------------------------------------------------------------
# padding, gradients, reproducibility
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "fbank-tiny"])
def test_layer_norm_models_same_features_alone_or_padded(preset):
    torch.manual_seed(7)
    model = build(preset).eval()
    if preset == "tiny":
        short, long = waves(1, 9000, seed=1), waves(1, 16000, seed=2)
        batch = torch.zeros(2, 16000)
        batch[0, :9000], batch[1] = short[0], long[0]
        lengths = torch.tensor([9000, 16000])
    else:
        g = torch.Generator().manual_seed(3)
        short, long = torch.randn(1, 60, 80, generator=g), torch.randn(1, 100, 80, generator=g)
        batch = torch.zeros(2, 100, 80)
        batch[0, :60], batch[1] = short[0], long[0]
        lengths = torch.tensor([60, 100])
    assert model.encoder.padding_is_exact()
    with torch.no_grad():
        padded = model.encoder(batch, lengths)
        alone = model.encoder(short)
        alone_long = model.encoder(long)
    n = alone.last_hidden_state.shape[1]
    assert int(padded.lengths[0]) == n
    assert (padded.last_hidden_state[0, :n] - alone.last_hidden_state[0]).abs().max() < 1e-4
    assert (padded.last_hidden_state[1] - alone_long.last_hidden_state[0]).abs().max() < 1e-4


def test_gradients_reach_quantizer_and_front_end_scaled():
    torch.manual_seed(9)
    reference = build("tiny", dropout=0.0, layerdrop=0.0).state_dict()
    results = {}
    for scale in (1.0, 0.1):
        model = build("tiny", feature_grad_scale=scale, dropout=0.0, layerdrop=0.0)
        model.load_state_dict(reference)
        torch.manual_seed(10)  # same masks, distractors and Gumbel noise for both scales
        out = model(waves())
        out.loss.backward()
        assert model.quantizer.codebook.grad.abs().sum() > 0
        assert model.quantizer.logits_proj.weight.grad.abs().sum() > 0
        assert model.target_projection.weight.grad.abs().sum() > 0
        conv = model.encoder.feature_encoder.layers[0].weight.grad
        assert conv is not None and conv.abs().sum() > 0
        results[scale] = (conv.clone(), model.encoder.feature_projection.weight.grad.clone())
    conv_full, proj_full = results[1.0]
    conv_scaled, proj_scaled = results[0.1]
    assert torch.allclose(proj_scaled, proj_full, atol=1e-6)  # above the front end: unchanged
    assert torch.allclose(conv_scaled, 0.1 * conv_full, rtol=1e-3, atol=1e-8)


def test_randomness_comes_from_torch_rng_state():
    model = build("tiny")  # dropout, layerdrop, masking, distractors and Gumbel noise all active
    x = waves()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = model(x)
    second = model(x)
    torch.set_rng_state(state)
    again = model(x)
    assert float(first.loss_sum) == float(again.loss_sum)
    assert torch.equal(first.mask_time, again.mask_time)
    assert float(first.loss_sum) != float(second.loss_sum)


# ---------------------------------------------------------------------------------------------------
# the fast paths agree with the plain ones
# ---------------------------------------------------------------------------------------------------

def test_cpu_dropout_keeps_the_right_fraction_and_scales():
    from speech_ssl.models.fastpath import dropout

    torch.manual_seed(12)
    x = torch.ones(400_000)
    y = dropout(x, 0.1, True)
    kept = y > 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert torch.equal(dropout(x, 0.1, False), x)


def test_training_attention_path_matches_sdpa():
    """With a vanishing dropout probability the spelled-out training path equals SDPA (eval path)."""
    from speech_ssl.models.transformer import SelfAttention

    torch.manual_seed(13)
    attention = SelfAttention(64, 4, dropout=1e-9)
    x = torch.randn(2, 30, 64)
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    mask[1, ..., 20:] = False
    reference = attention.eval()(x, mask)
    spelled = attention.train()(x, mask)
    assert (reference - spelled).abs().max() < 1e-5


def test_channels_last_convolution_matches_conv1d():
    from speech_ssl.models.fastpath import ChannelNormOverTime, StridedConv

    torch.manual_seed(14)
    for channels, kernel, stride in ((1, 10, 5), (4, 3, 2), (4, 2, 2), (3, 3, 1)):
        x = torch.randn(2, 23, channels, dtype=torch.float64, requires_grad=True)
        w = torch.randn(kernel, channels, 5, dtype=torch.float64, requires_grad=True)  # tap-major
        b = torch.randn(5, dtype=torch.float64, requires_grad=True)
        ours = StridedConv.apply(x, w, b, stride)
        ref = torch.nn.functional.conv1d(x.transpose(1, 2), w.permute(2, 1, 0), b, stride=stride).transpose(1, 2)
        assert (ours - ref).abs().max() < 1e-10
        assert torch.autograd.gradcheck(lambda x, w, b: StridedConv.apply(x, w, b, stride), (x, w, b),
                                        fast_mode=True)
    x = torch.randn(2, 17, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    group_norm = torch.nn.functional.group_norm(x.transpose(1, 2), 6, w, b).transpose(1, 2)
    assert (ChannelNormOverTime.apply(x, w, b, 1e-5) - group_norm).abs().max() < 1e-10
    assert torch.autograd.gradcheck(lambda x, w, b: ChannelNormOverTime.apply(x, w, b, 1e-5), (x, w, b),
                                    fast_mode=True)


@pytest.mark.parametrize("preset", ["tiny", "fbank-tiny"])
def test_front_end_with_lengths_gives_each_row_its_own_group_norm(preset):
    """``extract_features(..., exact_padding=True)``: the group norm over each row's valid steps (the
    waveform block's folded GEMM, or conv + masked norm), so a padded row's valid frames are those it has
    alone, through our kernels and through the generic ops alike."""
    from speech_ssl.models.fastpath import generic_ops

    torch.manual_seed(18)
    encoder = build(preset, conv_norm="group", conv_bias=False).encoder.eval()
    rows = [torch.randn(n) * 0.3 for n in (8000, 5333)] if preset == "tiny" else [torch.randn(n, 80) for n in (90, 61)]
    batch = torch.zeros(2, *rows[0].shape)
    batch[1, :len(rows[1])] = rows[1]
    batch[0] = rows[0]
    lengths = torch.tensor([len(r) for r in rows])
    for generic in (False, True):
        with torch.no_grad(), (generic_ops() if generic else contextlib.nullcontext()):
            feats = encoder.extract_features(batch, lengths, exact_padding=True)
            alone = encoder.extract_features(rows[1][None]).features[0]
            naive = encoder.extract_features(batch, lengths).features[1, :len(alone)]
        assert (feats.features[1, :len(alone)] - alone).abs().max() < 1e-4, generic
        assert (naive - alone).abs().max() > 1e-2  # without the lengths the padding shows: the test can tell


@pytest.mark.parametrize("preset", ["tiny", "fbank-tiny"])
def test_cpu_kernels_agree_with_generic_ops(preset):
    """Loss and gradients through our CPU kernels equal those through F.conv1d / SDPA (no dropout)."""
    from speech_ssl.models.fastpath import generic_ops

    overrides = dict(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0, layerdrop=0.0,
                     conv_norm="group", feature_penalty_weight=10.0)
    torch.manual_seed(15)
    model = build(preset, **overrides)
    if preset == "tiny":
        x = waves(2, 8000)
    else:
        x = torch.randn(2, 90, 80)
    results = []
    for generic in (False, True):
        model.zero_grad()
        torch.manual_seed(16)
        if generic:
            with generic_ops():
                out = model(x)
                out.loss.backward()
        else:
            out = model(x)
            out.loss.backward()
        results.append((out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_fast, grads_fast), (loss_generic, grads_generic) = results
    assert torch.allclose(loss_fast, loss_generic, rtol=1e-5, atol=1e-5)
    for key, grad in grads_fast.items():
        assert torch.allclose(grad, grads_generic[key], rtol=1e-3, atol=1e-6), key


def test_generic_ops_training_step_runs_with_dropout():
    """The ops other devices use (F.dropout, SDPA with dropout, F.conv1d) train too."""
    from speech_ssl.models.fastpath import generic_ops

    torch.manual_seed(17)
    model = build("tiny", layerdrop=0.0)
    with generic_ops():
        out = model(waves(2, 8000), torch.tensor([8000, 6000]))
        out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bucketed_lengths_round_up_a_little_and_repeat():
    from speech_ssl.models.fastpath import bucketed_length

    for n in list(range(1, 300)) + [1000, 3333, 12801, 99999]:
        b = bucketed_length(n)
        assert n <= b <= n * (1 + 1 / 16) + 1, (n, b)
        assert bucketed_length(b) == b
    assert len({bucketed_length(n) for n in range(1000, 16000)}) <= 16 * 4 + 1  # 16 an octave


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_bf16_front_end_with_bucketed_rows_is_unchanged(norm, monkeypatch):
    """Under CPU bf16 autocast the front end pads each GEMM's rows to a bucketed length (a kernel shape
    oneDNN has compiled before) and cuts them off again: features and gradients are those of the unpadded
    products, to bf16 rounding (a GEMM of another shape may block its sums differently)."""
    import speech_ssl.models.fastpath as fastpath
    from speech_ssl.models.fastpath import bucketed_length

    torch.manual_seed(14)
    model = build("tiny", **({} if norm == "layer" else dict(conv_norm="group", conv_bias=False)))
    encoder = model.encoder.feature_encoder
    x = 0.3 * torch.randn(2, 16000 + 1234)

    def run():
        encoder.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            y = encoder(x)
        (y.float() ** 2).mean().backward()
        return y.detach().float(), [p.grad.clone() for p in encoder.parameters()]

    padded_y, padded_grads = run()
    calls = []
    monkeypatch.setattr(fastpath, "bucketed_length", lambda n: calls.append(n) or n)
    plain_y, plain_grads = run()
    assert calls, "the bucketing was not asked for"
    assert any(bucketed_length(n) != n for n in calls), "no length was padded: the test tests nothing"
    assert (padded_y - plain_y).abs().max() <= 1e-2 * plain_y.abs().max(), (padded_y - plain_y).abs().max()
    for a, b in zip(padded_grads, plain_grads):  # bf16 sums over other blockings: rounding, not more
        assert (a - b).norm() <= 1e-2 * b.norm(), float((a - b).norm() / b.norm())
