"""Embedding throughput: ``speech-ssl embed`` (Ray Data + actor pool) against a plain transformers loop.

CPU mode (default), side by side in one run, each configuration in a fresh subprocess:

* ``hf``: the reference a user would write (torch's default threads; ``--loop-threads 0 1`` runs it with
  the default and with one thread, and the fastest is the reference): for each file, soundfile decode (+ torchaudio resample when
  needed), transformers' feature extractor (normalisation as the model was trained), transformers'
  ``Wav2Vec2Model`` (SDPA attention) on that one file, the requested layer copied out as numpy
  (``last_hidden_state`` for the last layer, ``hidden_states[L]`` otherwise). None of our code runs.
* ``ours``: ``speech_ssl.stages.embed.run`` on a private local Ray of ``--cpus`` CPUs: planning,
  Ray Data decode tasks, the command's default actor pool (on 2 CPUs: two one-thread actors), Parquet
  shards written (frame-level, float32).
* Same weights on both sides: a random ``base`` / ``tiny`` model saved in our format and exported with
  ``speech_ssl.models.export_hf`` for transformers.
* Figures: audio seconds per wall second (= audio hours per hour, = x real time) of the whole command or
  loop (model loading, Ray start and actor start included for ours; interpreter imports excluded for
  both), audio seconds per CPU second of the process tree (less sensitive to other people's load),
  padding waste, and peak memory of the whole process tree (PSS, shared pages counted once; RSS summed).
* A roofline per model and layer: the model's matrix-multiply FLOPs per audio second (at the subset's
  mean utterance length) against this machine's fp32 matmul rate (one thread and all), i.e. the most
  audio-s/s any exact fp32 implementation could reach here, and each side's share of it.
* Also the plain decode rate (soundfile + resample, one thread): how many decode cores a given
  embedding rate needs.

GPU mode (``--gpu``, alias ``--direct``): the Ray-free embedding batch function
(``speech_ssl.embed.Embedder``) for ``base`` against transformers' ``Wav2Vec2Model`` (same weights, SDPA)
on the same pre-decoded audio already in host memory (synthetic waveforms drawn by torch with the corpus'
length distribution, so neither a corpus nor soundfile, Ray or pyarrow is needed), the same batches planned
by the data layer (length-bucketed, padded), passes interleaved; bf16 autocast on GPUs; x real time = audio
seconds / wall seconds, host-to-device copy of the batch and device-to-host copy of the embeddings included;
the ratio ours / transformers. With ``--device cpu`` the same comparison runs on this CPU, in fp32 and, where
the CPU has native bf16, also in bf16 autocast (transformers' best configuration there; ``--precision`` picks
one). Also printed: the relative difference of the two on one unpadded utterance.

    .venv/bin/python benchmarks/bench_embed.py                      # 0.1 h subset: base last + middle, tiny
    .venv/bin/python benchmarks/bench_embed.py --hours 0.25 --models base
    python benchmarks/bench_embed.py --gpu                          # on a GPU machine (no Ray needed)
    python benchmarks/bench_embed.py --gpu --layer 6; python benchmarks/bench_embed.py --gpu --pooling mean
    .venv/bin/python benchmarks/bench_embed.py --gpu --device cpu   # CPU: fp32 and native bf16, 30 s of audio
    .venv/bin/python benchmarks/bench_embed.py --gpu --device cpu --model tiny --seconds 10 --warmup 0  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
DEFAULT_MANIFEST = HERE.parents[1] / "shared/data/tts-harvard/unlabeled.jsonl"
# Which hidden_states index each model is measured at: the last layer, and (base) a middle one.
LAYERS = {"base": [12, 6], "tiny": [4]}


# ---------------------------------------------------------------------------------------------------
# Measuring a process tree
# ---------------------------------------------------------------------------------------------------

class TreeUsage:
    """CPU seconds and peak memory of this process and every descendant.

    Sampled by one thread every ``interval`` seconds, so that processes that exit before the end (Ray's
    workers, raylet and GCS are gone once ``run`` returns) still count, up to their last sample. The
    sampler's own CPU time is subtracted; memory is PSS (a shared page counted once) and RSS, summed over
    the tree (``bench_ingest``'s readers of /proc).
    """

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval = interval
        self.peak_pss = self.peak_rss = 0  # kB
        self._cpu: dict[int, float] = {}
        self._start: dict[int, float] = {}
        self._sampler_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu_seconds(pid: int) -> float:
        from bench_ingest import cpu_ticks

        ticks = cpu_ticks(f"/proc/{pid}/stat")
        return ticks / os.sysconf("SC_CLK_TCK") if ticks >= 0 else -1.0

    def _sample(self, memory: bool = True) -> None:
        from bench_ingest import _mem_kb, _tree

        pss = rss = 0
        for pid in _tree(os.getpid()):
            value = self._cpu_seconds(pid)
            if value >= 0:
                self._start.setdefault(pid, value if pid == os.getpid() else 0.0)
                self._cpu[pid] = value
            if memory:
                p, r = _mem_kb(pid)
                pss, rss = pss + p, rss + r
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.thread_time()
            self._sample()
            self._sampler_cpu += time.thread_time() - t
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeUsage":
        self._sample(memory=False)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        total = sum(v - self._start.get(pid, 0.0) for pid, v in self._cpu.items())
        return total - self._sampler_cpu


# ---------------------------------------------------------------------------------------------------
# Children (one configuration each, in a fresh process)
# ---------------------------------------------------------------------------------------------------

def child_prepare(workdir: str, models: list[str], manifest: str, hours: float) -> dict:
    """Random-weight models in both formats, and the subset manifest (absolute paths)."""
    import torch
    from bench_ingest import load_subset

    from speech_ssl.models import build, export_hf, save_model

    for name in models:
        torch.manual_seed(0)
        model = build(name)
        save_model(model.encoder, Path(workdir) / f"ours_{name}")
        export_hf(model.encoder, Path(workdir) / f"hf_{name}")
    utts = load_subset(manifest, hours)
    with open(Path(workdir) / "subset.jsonl", "w") as f:
        for u in utts:
            f.write(json.dumps({"path": u.path, "duration": u.duration}) + "\n")
    return {"utterances": len(utts), "audio_s": sum(u.duration for u in utts)}


def encoder_flops_per_audio_second(model: str, layer: int, utterance_seconds: float) -> float:
    """Matrix-multiply FLOPs to embed one second of audio up to ``layer`` (bench_model's encoder count, for
    utterances of the given length)."""
    from bench_model import encoder_flops

    from speech_ssl.stages.common import resolve_model_config

    cfg = resolve_model_config(model, {})
    steps = int(utterance_seconds * (cfg.sample_rate if cfg.frontend == "conv" else 100))
    return encoder_flops(cfg, 1, steps, layer) / utterance_seconds


def child_roofline(workdir: str, model: str, layer: int, threads: int) -> dict:
    """The fp32 matmul rate of this machine (1 thread and ``threads``) and what it allows: the most audio-s/s
    any implementation doing the model's matrix products exactly could embed here."""
    import torch
    from bench_model import matmul_rate

    subset = [json.loads(line) for line in (Path(workdir) / "subset.jsonl").read_text().splitlines()]
    mean_seconds = sum(r["duration"] for r in subset) / len(subset)
    flops = encoder_flops_per_audio_second(model, layer, mean_seconds)
    out = {"gflop_per_audio_s": flops / 1e9, "mean_utterance_s": mean_seconds}
    for n in sorted({1, threads or torch.get_num_threads()}):
        torch.set_num_threads(n)
        rate = matmul_rate("cpu", torch.float32)
        out[f"matmul_gflops_{n}t"] = rate / 1e9
        out[f"bound_audio_s_per_s_{n}t"] = rate / flops
    return out


def child_hf(workdir: str, model: str, layer: int, threads: int) -> dict:
    import soundfile as sf
    import torch
    import torchaudio
    import transformers

    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in open(Path(workdir) / "subset.jsonl")]
    with TreeUsage() as usage:
        t0 = time.perf_counter()
        directory = Path(workdir) / f"hf_{model}"
        hf = transformers.Wav2Vec2Model.from_pretrained(directory).eval()
        extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(directory)
        last = layer == hf.config.num_hidden_layers
        seconds, kept = 0.0, 0
        for row in rows:
            samples, rate = sf.read(row["path"], dtype="float32", always_2d=True)
            wave = samples.mean(axis=1)
            if rate != 16000:
                wave = torchaudio.functional.resample(torch.from_numpy(wave), rate, 16000).numpy()
            inputs = extractor(wave, sampling_rate=16000, return_tensors="pt").input_values
            with torch.inference_mode():
                if last:
                    emb = hf(inputs).last_hidden_state[0].numpy().copy()
                else:
                    emb = hf(inputs, output_hidden_states=True).hidden_states[layer][0].numpy().copy()
            kept += emb.shape[0] > 0
            seconds += len(wave) / 16000
        wall = time.perf_counter() - t0
    mem = usage
    return {"run": f"hf {model} layer {layer} ({torch.get_num_threads()} threads)", "audio_s": seconds, "wall_s": wall, "rate": seconds / wall,
            "cpu_rate": seconds / usage.cpu_seconds, "peak_pss_mb": mem.peak_pss / 1024,
            "peak_rss_mb": mem.peak_rss / 1024,
            "threads": torch.get_num_threads(), "utterances": kept}


def child_ours(workdir: str, model: str, layer: int, cpus: int, batch_seconds: float, actors: int,
               threads: int, actor_cpus: float = 0.0) -> dict:
    import shutil

    from speech_ssl.data import DataConfig
    from speech_ssl.runtime import RayConfig
    from speech_ssl.stages.embed import Config, run

    out = Path(workdir) / f"out_{model}_{layer}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = Config(checkpoint=str(Path(workdir) / f"ours_{model}"), input=str(Path(workdir) / "subset.jsonl"),
                 output=str(out), layers=[layer], pooling="none", dtype="float32", progress_seconds=30,
                 num_actors=actors or None,
                 actor_cpus=actor_cpus or (float(threads) if threads else None),
                 data=DataConfig(shuffle=False, batch_seconds=batch_seconds),
                 ray=RayConfig(num_cpus=cpus, include_dashboard=False, object_store_memory_mb=400))
    with TreeUsage() as usage:
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
    mem = usage
    seconds = summary["audio_hours"]["this_run"] * 3600
    shutil.rmtree(out, ignore_errors=True)
    placed = summary["this_run"]["placement"]
    return {"run": f"ours {model} layer {layer} ({placed['num_actors']} actors x {placed['threads']} threads)",
            "audio_s": seconds, "wall_s": wall, "rate": seconds / wall,
            "cpu_rate": seconds / usage.cpu_seconds, "embed_s": summary["this_run"]["embed_seconds"],
            "actor_rate": seconds / max(summary["this_run"]["actor_seconds"], 1e-9),
            "padding_waste": summary["this_run"]["padding_waste"], "peak_pss_mb": mem.peak_pss / 1024,
            "peak_rss_mb": mem.peak_rss / 1024, "utterances": summary["counts"]["embedded_this_run"],
            "placement": summary["this_run"]["placement"]}


def child_decode(workdir: str) -> dict:
    """Plain decode + downmix + resample to 16 kHz, one thread: audio seconds per second per core."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in open(Path(workdir) / "subset.jsonl")]
    seconds = 0.0
    t0 = time.process_time()
    for row in rows:
        samples, rate = sf.read(row["path"], dtype="float32", always_2d=True)
        wave = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
        if rate != 16000:
            wave = torchaudio.functional.resample(wave, rate, 16000)
        seconds += wave.shape[0] / 16000
    cpu = time.process_time() - t0
    return {"run": "decode (soundfile + resample), 1 thread", "audio_s": seconds, "cpu_s": cpu,
            "rate_per_core": seconds / cpu}


def _child(args: list[str]) -> dict:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600, env=env)
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"benchmark child {args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------
# GPU mode: the embedding batch function alone
# ---------------------------------------------------------------------------------------------------

def synthetic_batches(args, device: str, seed: int = 0) -> tuple[list, float, float, list]:
    """Pre-decoded audio (torch only, no decoder): the corpus' length distribution (tts-harvard unlabeled:
    1.39 .. 4.30 s, mean 2.57 s), in batches planned by the data layer (length-bucketed, padded).
    Returns (batches of (waveforms, lengths), audio seconds, padded seconds, plan). Another ``seed`` gives
    other lengths from the same distribution."""
    import torch

    from speech_ssl.data import DataConfig
    from speech_ssl.data.plan import plan_epoch

    g = torch.Generator().manual_seed(seed)
    durations, total = [], 0.0
    while total < args.seconds:
        d = float(1.39 + (4.30 - 1.39) * torch.rand((), generator=g))
        durations.append(d)
        total += d
    waves = [0.1 * torch.randn(int(d * 16000), generator=g) for d in durations]
    data = DataConfig(shuffle=False, batch_seconds=args.batch_seconds, max_batch_size=args.max_batch_size)
    plan = plan_epoch(durations, data, "pad", seed=0, epoch=0)
    batches = []
    for rows in plan:
        lengths = torch.tensor([len(waves[i]) for i in rows])
        x = torch.zeros(len(rows), int(lengths.max()))
        for k, i in enumerate(rows):
            x[k, : len(waves[i])] = waves[i]
        batches.append((x.pin_memory() if device == "cuda" else x, lengths))
    padded = sum(x.numel() for x, _ in batches) / 16000
    return batches, total, padded, plan


class HFEmbedder:
    """transformers' ``Wav2Vec2Model`` (SDPA attention) with our weights, used as a user would on padded
    batches of the same (already normalised, as the data layer hands them to the Embedder) waveforms: transformers' convention for the attention mask (given to layer-norm front ends, not to
    group-norm ones such as BASE), ``last_hidden_state`` for the last layer and ``hidden_states[L]``
    otherwise, the same autocast and output dtype as ours, embeddings copied to host numpy per utterance."""

    def __init__(self, encoder, layer: int, pooling: str, device: str, precision: str, dtype: str):
        import torch
        import transformers

        from speech_ssl.models.convert import config_to_hf, to_hf_state_dict

        transformers.logging.set_verbosity_error()
        cfg = {k: v for k, v in config_to_hf(encoder.config, "Wav2Vec2Model").items()
               if k not in ("speech_ssl_model", "model_type")}
        config = transformers.Wav2Vec2Config(**cfg)
        config._attn_implementation = "sdpa"
        self.model = transformers.Wav2Vec2Model(config)
        missing, unexpected = self.model.load_state_dict(to_hf_state_dict(encoder.state_dict(), "Wav2Vec2Model"),
                                                         strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weights do not fit transformers' model: {missing[:4]} {unexpected[:4]}")
        self.model = self.model.to(device).eval()
        self.device = torch.device(device)
        self.layer, self.pooling, self.precision = layer, pooling, precision
        self.last = layer == config.num_hidden_layers
        self.use_mask = config.feat_extract_norm == "layer"
        self.out_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]

    def __call__(self, inputs, lengths) -> list:
        import torch

        from speech_ssl.precision import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            x = inputs.to(self.device, non_blocking=True)
            mask = None
            if self.use_mask:
                mask = torch.arange(x.shape[1], device=self.device)[None, :] < lengths.to(self.device)[:, None]
            out = self.model(x, attention_mask=mask, output_hidden_states=not self.last)
            h = out.last_hidden_state if self.last else out.hidden_states[self.layer]
            frames = self.model._get_feat_extract_output_lengths(lengths).clamp(max=h.shape[1])
            if self.pooling == "mean":
                valid = (torch.arange(h.shape[1], device=self.device)[None, :] < frames.to(self.device)[:, None])
                summed = (h.float() * valid[..., None]).sum(1)
                host = (summed / frames.clamp(min=1).to(self.device, summed.dtype)[:, None]).to(self.out_dtype).cpu()
                return [host[b].numpy() for b in range(host.shape[0])]
            host = h.to(self.out_dtype).cpu()
            return [host[b, : int(frames[b])].numpy() for b in range(host.shape[0])]


def gpu_precisions(requested: str, device: str) -> list[str]:
    """auto: bf16 on GPUs (fp16 where bf16 is missing); on CPUs fp32, plus bf16 where the CPU has native bf16
    (both, to compare against transformers' best configuration there). An explicit choice: itself."""
    from speech_ssl.precision import resolve_precision

    if requested != "auto":
        return [requested]
    resolved = resolve_precision("auto", device)
    return ["fp32", "bf16"] if device == "cpu" and resolved == "bf16" else [resolved]


def run_gpu(args) -> dict:
    """The Ray-free Embedder against transformers' Wav2Vec2Model on the same pre-decoded, length-sorted,
    padded batches, passes interleaved (ours, theirs, ours, ...), each pass on new batches from the same
    length distribution; x real time = audio s / wall s, host copies of the batch and of the embeddings
    included."""
    import torch

    from speech_ssl.embed import Embedder
    from speech_ssl.models import build
    from speech_ssl.precision import describe_cpu

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; dry-run with --device cpu")
    cuda = device == "cuda"
    precisions = gpu_precisions(args.precision, device)
    where = torch.cuda.get_device_name() if cuda else describe_cpu()
    print(f"machine: {where}; torch {torch.__version__}, {torch.get_num_threads()} threads; device {device}; "
          f"precision {args.precision} -> {', '.join(precisions)}", flush=True)
    torch.manual_seed(0)
    encoder = build(args.model).encoder.eval()
    batches, total, padded, plan = synthetic_batches(args, device)
    arms: dict[str, Any] = {}
    notes: dict[str, str] = {}
    layer = None
    for prec in precisions:
        dtype = "float16" if prec != "fp32" else "float32"
        try:
            ours = Embedder(encoder, layers=[args.layer], pooling=args.pooling, device=device, precision=prec,
                            dtype=dtype)
            arms[f"ours-{prec}"] = ours
            layer = ours.layers[0]
        except Exception as err:  # e.g. an Embedder that refuses bf16 on CPUs
            notes[f"ours-{prec}"] = f"{type(err).__name__}: {err}"
        if args.no_hf or layer is None:
            continue
        try:
            arms[f"transformers-{prec}"] = HFEmbedder(encoder, layer, args.pooling, device, prec, dtype)
        except ImportError as err:
            notes[f"transformers-{prec}"] = f"transformers is not installed ({err}): side-by-side run skipped"
    for name, note in notes.items():
        print(f"{name}: {note}", flush=True)

    # Every timed pass of every arm embeds batches of its own, never seen before: in a corpus hardly two
    # batches (or, with the CPU's row-by-row front end, two utterances) have the same shape, and on CPUs
    # oneDNN builds (JIT-compiles) its bf16 kernels per shape. Passes over the same batches again would
    # time its primitive cache, favouring the side with fewer distinct shapes.
    pass_seeds = iter(range(1, 1 << 30))

    def one_pass(fn) -> tuple[float, float]:
        seconds = 0.0
        fresh, *_ = synthetic_batches(args, device, seed=next(pass_seeds))
        start = time.perf_counter()
        for x, lengths in fresh:
            fn(x, lengths)  # copies the embeddings to host numpy: synchronises
            seconds += float(lengths.sum()) / 16000
        return seconds, time.perf_counter() - start

    # The same outputs: the longest utterance of the first batch (unpadded, so transformers' convention of no
    # mask for group-norm front ends does not change it) in each precision. (For pre-LN models such as tiny,
    # transformers' last hidden state has the final LayerNorm applied, our hidden_states[last] not.)
    parity = {}
    x0, l0 = batches[0]
    row = int(torch.argmax(l0))
    for prec in precisions:
        a, b = arms.get(f"ours-{prec}"), arms.get(f"transformers-{prec}")
        if a is not None and b is not None:
            mine = torch.from_numpy(a(x0, l0)[row][layer]).float()
            theirs = torch.from_numpy(b(x0, l0)[row]).float()
            n = min(len(mine), len(theirs))
            parity[prec] = float((mine[:n] - theirs[:n]).norm() / theirs[:n].norm().clamp(min=1e-12))

    for _ in range(args.warmup):
        for fn in arms.values():
            one_pass(fn)
    stats = {name: {"audio_s": 0.0, "wall_s": 0.0, "passes": []} for name in arms}
    peaks: dict[str, int] = {}
    weights = {name: sum(p.numel() * p.element_size() for p in (encoder if name.startswith("ours")
                                                                 else fn.model).parameters())
               for name, fn in arms.items()}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            seconds, wall = one_pass(fn)
            if cuda:  # both models stay on the GPU: each arm's own weights plus what its pass allocated
                peaks[name] = max(peaks.get(name, 0), weights[name] + torch.cuda.max_memory_allocated() - before)
            stats[name]["audio_s"] += seconds
            stats[name]["wall_s"] += wall
            stats[name]["passes"].append(seconds / wall)
    runs = []
    for name, st in stats.items():
        impl, prec = name.split("-")
        run = {"run": f"{'Embedder' if impl == 'ours' else 'transformers Wav2Vec2Model'} {args.model} layer {layer} "
                      f"{prec} on {device}", "impl": impl, "precision": prec, "audio_s": st["audio_s"],
               "wall_s": st["wall_s"], "x_real_time": st["audio_s"] / st["wall_s"], "passes": st["passes"]}
        if name in peaks:
            run["peak_gpu_memory_gb"] = peaks[name] / 2 ** 30
        if args.decode_rate and impl == "ours":
            run["decode_cores_needed"] = run["x_real_time"] / args.decode_rate
        runs.append(run)
        print(f"{run['run']}: {run['x_real_time']:.1f}x real time ({run['audio_s']:.0f} audio-s in "
              f"{run['wall_s']:.2f} s; passes " + ", ".join(f"{r:.1f}" for r in st["passes"]) + ")"
              + (f", peak GPU memory {run['peak_gpu_memory_gb']:.2f} GB" if "peak_gpu_memory_gb" in run else ""),
              flush=True)
    rate = {r["impl"] + "-" + r["precision"]: r["x_real_time"] for r in runs}
    ratios: dict[str, float] = {}
    for prec in precisions:
        if f"ours-{prec}" in rate and f"transformers-{prec}" in rate:
            ratios[f"ours/transformers {prec}"] = rate[f"ours-{prec}"] / rate[f"transformers-{prec}"]
    best = {impl: max((k for k in rate if k.startswith(impl + "-")), key=rate.get, default=None)
            for impl in ("ours", "transformers")}
    if len(precisions) > 1 and best["ours"] and best["transformers"]:
        ratios[f"ours best ({best['ours']}) / transformers best ({best['transformers']})"] = \
            rate[best["ours"]] / rate[best["transformers"]]
    if "ours-bf16" in rate and "ours-fp32" in rate:
        ratios["ours bf16/ours fp32"] = rate["ours-bf16"] / rate["ours-fp32"]
    for key, value in ratios.items():
        print(f"==> {key}: {value:.2f}x", flush=True)
    for prec, diff in parity.items():
        print(f"ours vs transformers ({prec}), longest utterance of the first batch: relative difference "
              f"{diff:.2e}", flush=True)
    result = {"device": device, "machine": where, "model": args.model, "layer": layer, "pooling": args.pooling,
              "precisions": precisions, "runs": runs, "ratios": ratios, "parity_rel_diff": parity, "notes": notes,
              "batches": len(batches), "mean_batch_size": sum(len(r) for r in plan) / len(plan),
              "padding_waste": 1 - total / padded}
    return result


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--hours", type=float, default=0.1, help="random subset of this many hours (0: all)")
    parser.add_argument("--models", nargs="+", default=["base", "tiny"], choices=list(LAYERS))
    parser.add_argument("--layers", type=int, nargs="+", help="only these layers (default: last, and middle for base)")
    parser.add_argument("--sides", nargs="+", default=["hf", "ours"], choices=["hf", "ours"])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    parser.add_argument("--batch-seconds", type=float, default=40.0)
    parser.add_argument("--actors", type=int, default=0, help="model actors (0: the command's default)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPUs (= torch threads) of each model actor (0: the command's default)")
    parser.add_argument("--loop-threads", type=int, nargs="+", default=[0],
                        help="torch threads of the transformers loop, one loop run per value (0: torch's default, "
                             "all cores); the ratio is taken against the fastest")
    parser.add_argument("--actor-cpus", type=float, default=0.0,
                        help="CPUs of each model actor (0: from --threads, else the command's default); e.g. "
                             "--actors 2 --actor-cpus 0.75: two one-thread actors beside the decode tasks")
    parser.add_argument("--trials", type=int, default=2,
                        help="interleaved runs of each side; the best rate counts (other people's load only slows)")
    # GPU mode
    parser.add_argument("--gpu", "--direct", dest="gpu", action="store_true",
                        help="the Ray-free Embedder against transformers on the same pre-decoded batches (on "
                             "--device: cuda, or cpu for the CPU comparison in fp32 and native bf16)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="--gpu mode: auto = bf16 on GPUs; on CPUs fp32, and bf16 too where the CPU has it")
    parser.add_argument("--no-hf", action="store_true", help="--gpu mode: skip transformers")
    parser.add_argument("--model", default="base")
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--pooling", default="none", choices=["none", "mean"])
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="--gpu mode: audio seconds per pass (0: 3600 on GPUs, 30 on CPUs)")
    parser.add_argument("--gpu-batch-seconds", dest="gpu_batch_seconds", type=float, default=0.0,
                        help="--gpu mode: padded audio seconds per batch (0: 640 on GPUs, 40 on CPUs)")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-rate", type=float, default=0.0,
                        help="GPU mode: decode audio-s/s per core (from the CPU run) to state the cores needed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--layer-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu:
        cuda = args.device.startswith("cuda")
        args.seconds = args.seconds or (3600.0 if cuda else 30.0)
        args.batch_seconds = args.gpu_batch_seconds or (640.0 if cuda else 40.0)
    return args


def main() -> None:
    args = parse_args()

    if args.gpu:
        print(json.dumps(run_gpu(args)))
        return
    if args.child == "prepare":
        print(json.dumps(child_prepare(args.workdir, args.models, args.manifest, args.hours)))
        return
    if args.child == "hf":
        print(json.dumps(child_hf(args.workdir, args.model, args.layer, args.loop_threads[0])))
        return
    if args.child == "ours":
        print(json.dumps(child_ours(args.workdir, args.model, args.layer, args.cpus, args.batch_seconds, args.actors,
                                    args.threads, args.actor_cpus)))
        return
    if args.child == "roofline":
        print(json.dumps(child_roofline(args.workdir, args.model, args.layer, args.threads)))
        return
    if args.child == "decode":
        print(json.dumps(child_decode(args.workdir)))
        return

    if not Path(args.manifest).exists():
        print(f"skipped: {args.manifest} not found (the shared corpora are not on this machine)")
        return
    workdir = tempfile.mkdtemp(prefix="bench_embed_")
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs; work dir {workdir}", flush=True)
    prep = _child(["--child", "prepare", "--workdir", workdir, "--manifest", args.manifest, "--hours",
                   str(args.hours), "--models", *args.models])
    print(f"subset: {prep['utterances']} utterances, {prep['audio_s'] / 3600:.3f} h of {args.manifest}", flush=True)
    results = {"subset": prep, "runs": [], "load_before": os.getloadavg()}
    decode = _child(["--child", "decode", "--workdir", workdir])
    results["decode"] = decode
    print(f"{decode['run']}: {decode['rate_per_core']:.0f} audio-s per CPU-s", flush=True)
    for model in args.models:
        for layer in [l for l in LAYERS[model] if not args.layers or l in args.layers]:
            # One loop run per --loop-threads value ("hf" for torch's default threads, "hf_t1" for one, ...).
            arms = [(side, t) for side in args.sides for t in (args.loop_threads if side == "hf" else [0])]
            label = lambda side, t: f"{side}_t{t}" if t else side  # noqa: E731
            trials: dict[str, list[dict]] = {label(side, t): [] for side, t in arms}
            for _ in range(args.trials):
                for side, loop_threads in arms:
                    load = os.getloadavg()[0]
                    res = _child(["--child", side, "--workdir", workdir, "--model", model, "--layer", str(layer),
                                  "--cpus", str(args.cpus), "--batch-seconds", str(args.batch_seconds),
                                  "--actors", str(args.actors), "--threads", str(args.threads),
                                  "--actor-cpus", str(args.actor_cpus), "--loop-threads", str(loop_threads)])
                    res["load_before"], res["load_after"] = load, os.getloadavg()[0]
                    trials[label(side, loop_threads)].append(res)
                    extra = (f", padding {100 * res['padding_waste']:.1f}%, pipeline {res['embed_s']:.1f} s, "
                             f"actor alone {res['actor_rate']:.2f} audio-s/s" if side == "ours" else "")
                    print(f"{res['run']}: {res['audio_s']:.0f} audio-s in {res['wall_s']:.1f} s = {res['rate']:.2f} "
                          f"audio-s/s ({res['cpu_rate']:.2f} per CPU-s){extra}; peak memory "
                          f"{res['peak_pss_mb']:.0f} MB PSS ({res['peak_rss_mb']:.0f} MB RSS); load "
                          f"{res['load_before']:.1f} -> {res['load_after']:.1f}", flush=True)
            roof = _child(["--child", "roofline", "--workdir", workdir, "--model", model, "--layer", str(layer),
                           "--threads", str(args.threads)])
            bound = max(v for k, v in roof.items() if k.startswith("bound_audio_s_per_s_"))
            rates = ", ".join(f"{roof[k]:.0f} GFLOP/s with {k.split('_')[-1][:-1]} thread(s)"
                              for k in sorted(roof) if k.startswith("matmul_gflops_"))
            print(f"roofline {model} layer {layer}: {roof['gflop_per_audio_s']:.1f} GFLOP per audio-s (utterances "
                  f"of {roof['mean_utterance_s']:.1f} s on average); matmul rate {rates}: at most {bound:.2f} "
                  f"audio-s/s at 100% of it" + "".join(
                      f"; {side} best {100 * max(r['rate'] for r in runs) / bound:.0f}% of that"
                      for side, runs in trials.items()), flush=True)
            best = {side: max(runs, key=lambda r: r["rate"]) for side, runs in trials.items()}
            loops = [side for side in best if side.startswith("hf")]
            if "ours" not in best or not loops:
                results["runs"].append({"model": model, "layer": layer, "best": best, "trials": trials,
                                        "roofline": roof})
                continue
            loop = max(loops, key=lambda side: best[side]["rate"])  # the fastest loop is the reference
            ratios = {side: best["ours"]["rate"] / best[side]["rate"] for side in loops}
            cpu_ratio = (max(r["cpu_rate"] for r in trials["ours"]) / max(r["cpu_rate"] for r in trials[loop]))
            print(f"==> {model} layer {layer}: ours / fastest transformers loop ({loop}) = {ratios[loop]:.2f}x wall "
                  f"(best of {args.trials}; {cpu_ratio:.2f}x per CPU-s)"
                  + "".join(f"; / {side}: {r:.2f}x" for side, r in ratios.items() if side != loop), flush=True)
            results["runs"].append({"model": model, "layer": layer, "ratio": ratios[loop], "ratios": ratios,
                                    "reference_loop": loop, "cpu_ratio": cpu_ratio, "best": best, "trials": trials,
                                    "roofline": roof, "max_ratio_at_roofline": bound / best[loop]["rate"]})
            print(f"    the most any exact fp32 implementation could reach here: {bound / best[loop]['rate']:.2f}x "
                  "the fastest loop", flush=True)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
