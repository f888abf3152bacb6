"""The embedding batch function and the Parquet shards, without Ray.

* An utterance gets the same embedding (1e-4) alone or in any padded batch, for layer-norm and
  group-norm front ends, with the front end run on the whole batch (GPU default; group norm through
  masked statistics) or per utterance (CPU default), and in exact-length batches.
* Layer numbering and values agree with transformers' ``hidden_states`` (a random transformers model
  saved with ``save_pretrained`` and loaded through our loader).
* Mean pooling is the mean of the frame-level embedding over valid frames; float16 output.
* Precision: ``auto`` resolves as documented (bf16 on CPUs with native bf16, fp32 elsewhere, bf16/fp16
  on GPUs); bf16 autocast on the CPU (batched front end with masked group-norm statistics, and per
  utterance) matches fp32 within bf16 tolerances (relative error < 4e-2, cosine > 0.99 per frame).
* ``embed_batches`` gives ``__call__``'s results, in order, finishing batch i only after batch i+1 was
  launched (the copy-overlap schedule of GPUs, checked with stand-in copy events on the CPU).
* ``compile=True`` gives eager mode's embeddings (1e-4) and does not recompile for another batch shape.
* Shards: the table reads back as [frames, dim]; unfinished temporary files and shards of another
  configuration are never taken for finished work.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import speech_ssl.precision as precision_mod
from speech_ssl.config import ConfigError
from speech_ssl.embed import Embedder, resolve_layers
from speech_ssl.embed import shards as shard_io
from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import build

TOL = 1e-4
GROUP_NORM = dict(conv_norm="group", conv_bias=False, layer_norm_first=False, normalize_waveform=False)


def padded(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    return batch, lengths


def waves_of(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(n, generator=g) for n in lengths]


@pytest.fixture(scope="module", params=["layer", "group"])
def model(request):
    torch.manual_seed(0)
    return request.param, build("tiny", **(GROUP_NORM if request.param == "group" else {}))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_frontend", [True, False], ids=["batched-front-end", "front-end-per-utterance"])
def test_same_embedding_alone_or_in_any_batch(model, batch_frontend):
    norm, m = model
    embedder = Embedder(m, layers=[0, 2, -1], pooling="none", batch_frontend=batch_frontend, precision="fp32")
    assert embedder.layers == [0, 2, 4]
    lengths = [8000, 4501, 6173, 2000]
    waves = waves_of(lengths)
    alone = [embedder(w[None])[0] for w in waves]
    for order in ([0, 1, 2, 3], [3, 1, 0]):
        batch, lens = padded([waves[i] for i in order])
        out = embedder(batch, lens)
        for k, i in enumerate(order):
            for layer in embedder.layers:
                assert out[k][layer].shape == alone[i][layer].shape
                assert np.abs(out[k][layer] - alone[i][layer]).max() < TOL, (norm, order, i, layer)
    # The frame count is what the front end gives for the valid samples.
    assert alone[1][0].shape == (int(embedder.output_lengths(torch.tensor([4501]))[0]), 256)
    if norm == "group" and batch_frontend:
        # Without masked statistics a padded row would differ: the test can tell.
        batch, lens = padded([waves[0], waves[3]])
        with torch.no_grad():
            naive = m.encoder.eval()(batch, lens, output_hidden_states=True).hidden_states[2][1]
        frames = alone[3][2].shape[0]
        assert np.abs(naive[:frames].numpy() - alone[3][2]).max() > 1e-2


@pytest.mark.timeout(60)
def test_exact_length_batch_needs_no_mask_and_matches(model):
    _, m = model
    embedder = Embedder(m, layers=[1], pooling="none", precision="fp32")
    waves = waves_of([8000, 8000, 8000], seed=3)
    batch = torch.stack(waves)
    together = embedder(batch, torch.tensor([8000] * 3))
    for k, w in enumerate(waves):
        assert np.abs(together[k][1] - embedder(w[None])[0][1]).max() < TOL


@pytest.mark.timeout(60)
def test_mean_pooling_is_the_mean_over_valid_frames_and_float16(model):
    _, m = model
    frame = Embedder(m, layers=[1, 3], pooling="none", precision="fp32")
    mean = Embedder(m, layers=[1, 3], pooling="mean", precision="fp32")
    half = Embedder(m, layers=[1, 3], pooling="mean", dtype="float16", precision="fp32")
    batch, lens = padded(waves_of([12000, 7000, 10000], seed=5))
    frames, pooled, pooled16 = frame(batch, lens), mean(batch, lens), half(batch, lens)
    for b in range(3):
        for layer in (1, 3):
            assert pooled[b][layer].shape == (256,)
            assert np.abs(pooled[b][layer] - frames[b][layer].mean(axis=0)).max() < TOL
            assert pooled16[b][layer].dtype == np.float16
            assert np.abs(pooled16[b][layer].astype(np.float32) - pooled[b][layer]).max() < 2e-2


def test_layer_numbers_resolve_and_out_of_range_is_a_config_error():
    assert resolve_layers([-1, 0, 6, 6], 12) == [0, 6, 12]
    assert resolve_layers([-13], 12) == [0]
    with pytest.raises(ConfigError, match="layer 13 does not exist"):
        resolve_layers([13], 12)
    with pytest.raises(ConfigError, match="layers"):
        resolve_layers([], 12)
    with pytest.raises(ConfigError, match="fp16 is not used on CPUs"):
        Embedder(build("tiny"), precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="unknown precision"):
        Embedder(build("tiny"), precision="half", device="cpu")


# ---------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------

def test_precision_auto_resolves_by_device_and_cpu_features(monkeypatch, caplog):
    resolve = precision_mod.resolve_precision
    monkeypatch.setattr(precision_mod, "cpu_bf16_features", lambda: ("amx_bf16", "avx512_bf16"))
    with caplog.at_level("DEBUG", logger="speech_ssl.precision"):
        assert resolve("auto", "cpu") == "bf16"
    assert "amx_bf16" in caplog.text  # the detected features are logged
    embedder = Embedder(build("tiny"))  # the default is auto
    assert (embedder.requested_precision, embedder.precision) == ("auto", "bf16")
    assert resolve("fp32", "cpu") == "fp32" and resolve("bf16", "cpu") == "bf16"

    monkeypatch.setattr(precision_mod, "cpu_bf16_features", lambda: ())
    assert resolve("auto", "cpu") == "fp32"
    assert Embedder(build("tiny")).precision == "fp32"
    caplog.clear()
    with caplog.at_level("WARNING", logger="speech_ssl.precision"):
        assert resolve("bf16", "cpu") == "bf16"  # forced: allowed, with a warning
    assert "emulated" in caplog.text
    with pytest.raises(ConfigError, match="fp16 is not used on CPUs"):
        resolve("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve("bfloat16", "cpu")

    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert resolve("auto", "cuda") == expected
    assert resolve("fp16", "cuda") == "fp16" and resolve("fp32", "cuda:0") == "fp32"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_frontend", [True, False], ids=["batched-front-end", "front-end-per-utterance"])
def test_bf16_embedder_casts_weights_once_and_buckets_shapes_without_changing_results(model, batch_frontend,
                                                                                       monkeypatch):
    """In bf16 on a CPU the Embedder keeps its own copy of the encoder with the matmul weights in bf16 (the
    caller's model stays fp32) and pads GEMM rows and Transformer frames to bucketed lengths; the
    embeddings are bit for bit those of autocast over the caller's fp32 model without any padding."""
    import speech_ssl.models.fastpath as fastpath
    from speech_ssl.models.fastpath import bucketed_length

    _, m = model
    embedder = Embedder(m, layers=[1, -1], pooling="none", precision="bf16", batch_frontend=batch_frontend)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    linears = [mod for mod in embedder.encoder.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(mod.weight.dtype == torch.bfloat16 for mod in linears)
    lengths = [21000, 4501, 16173, 2000]
    front = m.encoder.feature_encoder
    first = [(n - front.kernels[0]) // front.strides[0] + 1 for n in lengths]  # the first block's rows
    frames = embedder.output_lengths(torch.tensor(lengths)).tolist()  # the Transformer's frames
    assert any(bucketed_length(n) != n for n in first) and bucketed_length(max(frames)) != max(frames)
    batch, lens = padded(waves_of(lengths, seed=12))
    fast = embedder(batch, lens)
    embedder.encoder = m.encoder  # the caller's fp32 weights, cast by autocast at every product
    monkeypatch.setattr(fastpath, "bucketed_length", lambda n, per_octave=16: n)
    plain = embedder(batch, lens)
    for b in range(len(lengths)):
        for layer in embedder.layers:
            rel = np.linalg.norm(fast[b][layer] - plain[b][layer]) / np.linalg.norm(plain[b][layer])
            assert rel < 5e-3, (b, layer, rel)  # bf16 vs fp32 is about 2e-2 (test above)


def _relative_error_and_cosine(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    return rel, float(cos.min())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_frontend", [True, False], ids=["batched-front-end", "front-end-per-utterance"])
def test_bf16_on_cpu_matches_fp32(model, batch_frontend):
    norm, m = model
    fp32 = Embedder(m, layers=[0, 2, -1], pooling="none", precision="fp32", batch_frontend=batch_frontend)
    bf16 = Embedder(m, layers=[0, 2, -1], pooling="none", precision="bf16", batch_frontend=batch_frontend)
    mean = Embedder(m, layers=[0, 2, -1], pooling="mean", precision="bf16", batch_frontend=batch_frontend)
    assert bf16.precision == "bf16"
    batch, lens = padded(waves_of([8000, 4501, 6173, 2000], seed=11))
    ref, got, pooled = fp32(batch, lens), bf16(batch, lens), mean(batch, lens)
    with torch.inference_mode():
        hidden, _ = bf16.hidden_states(batch, lens)
    assert all(h.dtype == torch.bfloat16 for h in hidden.values())  # autocast ran
    largest = 0.0
    for b in range(len(ref)):
        for layer in fp32.layers:
            assert got[b][layer].dtype == np.float32 and got[b][layer].shape == ref[b][layer].shape
            rel, cos = _relative_error_and_cosine(got[b][layer], ref[b][layer])
            assert rel < 4e-2 and cos > 0.99, (norm, b, layer, rel, cos)
            largest = max(largest, float(np.abs(got[b][layer] - ref[b][layer]).max()))
            rel, cos = _relative_error_and_cosine(pooled[b][layer], ref[b][layer].mean(axis=0))
            assert rel < 4e-2 and cos > 0.99, (norm, b, layer, rel, cos)
    assert largest > 1e-3  # bf16 arithmetic really happened (fp32 reruns agree to ~1e-6)


# ---------------------------------------------------------------------------------------------------
# embed_batches: the schedule that overlaps host copies with the next batch on GPUs
# ---------------------------------------------------------------------------------------------------

class _StandInEvent:
    """A CUDA event stand-in recording when a batch's copies are waited for."""

    def __init__(self, log: list, index: int):
        self.log, self.index = log, index

    def synchronize(self):
        self.log.append(("wait", self.index))


def test_embed_batches_yields_in_order_and_overlaps_one_batch(monkeypatch):
    torch.manual_seed(0)
    embedder = Embedder(build("tiny"), layers=[1, -1], pooling="none", precision="fp32")
    batches = [padded(waves_of(lengths, seed=k)) for k, lengths in enumerate([[6000, 4000], [5000], [7000, 7000, 3000]])]
    batches[1] = batches[1][0]  # a bare tensor: nothing padded
    expected = [embedder(*b) if isinstance(b, tuple) else embedder(b) for b in batches]

    # On the CPU every batch is yielded as soon as it is computed.
    for got, want in zip(embedder.embed_batches(iter(batches)), expected, strict=True):
        assert [sorted(g) for g in got] == [sorted(w) for w in want]
        for g, w in zip(got, want):
            assert all(np.array_equal(g[layer], w[layer]) for layer in w)

    # With copies in flight (GPUs), batch i is finished only after batch i+1 was launched.
    events: list = []
    launch = embedder._launch

    def launch_with_copy_event(inputs, lengths):
        flight = launch(inputs, lengths)
        events.append(("launch", len([e for e in events if e[0] == "launch"])))
        flight.copied = _StandInEvent(events, events[-1][1])
        return flight

    monkeypatch.setattr(embedder, "_launch", launch_with_copy_event)
    got = []
    for out in embedder.embed_batches(iter(batches)):
        events.append(("yield", len(got)))
        got.append(out)
    assert events == [("launch", 0), ("launch", 1), ("wait", 0), ("yield", 0), ("launch", 2), ("wait", 1),
                      ("yield", 1), ("wait", 2), ("yield", 2)]
    for out, want in zip(got, expected):
        for g, w in zip(out, want):
            assert all(np.array_equal(g[layer], w[layer]) for layer in w)
            assert all(g[layer].base is None or g[layer].base.flags.owndata for layer in w)  # own copies
    # An abandoned iterator still waits for the copies it started.
    events.clear()
    iterator = embedder.embed_batches(iter(batches))
    next(iterator)
    iterator.close()
    assert events[-1] == ("wait", 1)


# ---------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # about 25 s with a cold inductor cache, 8 s warm
@pytest.mark.timeout(300)
def test_compiled_embedder_matches_eager_and_keeps_its_graphs():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    m = build("tiny", **GROUP_NORM)  # the masked group-norm path: the most code under compile
    eager = Embedder(m, layers=[1, -1], pooling="none", precision="fp32", batch_frontend=True)
    compiled = Embedder(m, layers=[1, -1], pooling="none", precision="fp32", batch_frontend=True, compile=True)
    assert compiled._context is not compiled._context_eager
    for k, lengths in enumerate([[8000, 5000, 6100], [7000, 6999, 4000, 3000]]):
        batch, lens = padded(waves_of(lengths, seed=20 + k))
        got = compiled(batch, lens)
        if k == 0:
            graphs = counters["stats"]["unique_graphs"]
        ref = eager(batch, lens)
        for b in range(len(lengths)):
            for layer in eager.layers:
                assert got[b][layer].shape == ref[b][layer].shape
                assert np.abs(got[b][layer] - ref[b][layer]).max() < TOL, (k, b, layer)
    assert counters["stats"]["unique_graphs"] == graphs  # another batch size and width: no recompilation


# ---------------------------------------------------------------------------------------------------
# transformers' hidden_states numbering
# ---------------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_layers_match_transformers_hidden_states(norm, tmp_path):
    transformers = pytest.importorskip("transformers")
    mode = (dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True) if norm == "layer"
            else dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False))
    config = transformers.Wav2Vec2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=4, **mode)
    torch.manual_seed(2)
    hf = transformers.Wav2Vec2Model(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    embedder = Embedder.from_checkpoint(str(tmp_path / "hf"), layers=[0, 1, 3], pooling="none", precision="fp32")
    waves = waves_of([9000, 6400], seed=7)
    ours = embedder(*padded(waves))
    for k, w in enumerate(waves):
        with torch.no_grad():
            ref = hf(w[None], output_hidden_states=True).hidden_states
        assert len(ref) == 4
        for layer in (0, 1, 3):
            assert np.abs(ours[k][layer] - ref[layer][0].numpy()).max() < TOL, (norm, k, layer)


# ---------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------

def _builder(fp: dict, pooling: str = "none", dtype: str = "float32", prefix: str = "utt") -> shard_io.ShardBuilder:
    builder = shard_io.ShardBuilder(dim=4, pooling=pooling, dtype=dtype, metadata={"fingerprint": fp})
    rng = np.random.default_rng(0)
    for i, frames in enumerate([3, 5]):
        emb = {layer: rng.standard_normal((frames, 4) if pooling == "none" else (4,)).astype(dtype)
               for layer in (0, 2)}
        builder.add(f"{prefix}{i}", f"audio/{prefix}{i}.wav", 0.0, frames * 0.02, frames, emb)
    return builder


@pytest.mark.parametrize("pooling,dtype", [("none", "float32"), ("mean", "float16")])
def test_shard_table_reads_back_with_pyarrow(tmp_path, pooling, dtype):
    out = shard_io.OutputDir(str(tmp_path))
    builder = _builder({"a": 1}, pooling, dtype)
    out.write_table("part-r001-00000.parquet", builder.table())
    table = pq.read_table(tmp_path / "part-r001-00000.parquet")
    assert table.column("id").to_pylist() == ["utt0", "utt0", "utt1", "utt1"]
    assert table.column("layer").to_pylist() == [0, 2, 0, 2]
    for row, expected in enumerate(builder.values):
        got = np.array(table.column("embedding")[row].as_py(), dtype=np.float32)
        assert got.shape == expected.shape
        assert np.array_equal(got, expected.astype(np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["part-r001-00000.parquet"]  # no temporary left


def test_scan_ignores_temporary_files_and_refuses_other_configurations(tmp_path):
    out = shard_io.OutputDir(str(tmp_path))
    out.write_table("part-r001-00000.parquet", _builder({"a": 1}).table())
    # A leftover of an interrupted write: a whole, valid Parquet file under the temporary name.
    leftover = tmp_path / ".part-r001-00001.parquet.tmp-0123456789ab"
    pq.write_table(_builder({"a": 1}, prefix="x").table(), leftover)
    existing = shard_io.scan_output(out, {"a": 1})
    assert existing.shards == ["part-r001-00000.parquet"]
    assert existing.stale_temps == [leftover.name]
    assert shard_io.complete_ids(existing, 2) == {"utt0", "utt1"}
    assert existing.last_run == 1
    with pytest.raises(SpeechSSLError, match="another configuration .*differs in: a"):
        shard_io.scan_output(out, {"a": 2})
