"""Pretraining step throughput of speech_ssl's wav2vec 2.0 against transformers, side by side.

One training step = forward + backward + AdamW step on the same batch (default 4 x 6 s of audio).
`base` runs against transformers' Wav2Vec2ForPreTraining built with the identical configuration (same
sizes, dropouts, LayerDrop, mask probability / span / minimum, K distractors, codebook, diversity
weight). The two are timed in alternation (ours, theirs, ours, ...) so that load from other processes
falls on both; transformers' masks and distractor indices are drawn outside its timed region (its data
collator's job), ours inside (they are part of our forward).

Also reported: this machine's fp32 matmul rate (measured in the same run), the model FLOPs we count
per step and the fraction of the matmul rate each implementation reaches, and for `tiny` and
`fbank-tiny` throughput and peak memory (each measured in a fresh process).

    python benchmarks/bench_model.py                       # CPU, fp32: base vs transformers + tiny presets
    python benchmarks/bench_model.py --presets tiny,fbank-tiny --no-hf
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 16 --steps 10   # GPU, MFU of base
    python benchmarks/bench_model.py --profile prof.txt    # torch.profiler table of one step of ours

Runs without Ray. Needs transformers for the comparison (skipped with a note when missing).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech_ssl.models import ModelConfig, build  # noqa: E402
from speech_ssl.models.convert import config_to_hf  # noqa: E402

SAMPLE_RATE = 16000
FBANK_HOP_S = 0.01


# ---------------------------------------------------------------------------------------------------
# machine rate and model FLOPs
# ---------------------------------------------------------------------------------------------------

def matmul_rate(device: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Sustained square-matmul FLOP/s (n=2048 on CPU, 8192 on GPU)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device != "cpu" and reps % 10:
            continue
        sync(device)
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encoder_flops(cfg: ModelConfig, batch: int, steps_in: int, num_layers: Optional[int] = None) -> float:
    """Matrix-multiply FLOPs of the encoder up to ``num_layers`` Transformer layers (all by default): convs,
    feature projection, positional convolution, attention projections, attention, feed-forward."""
    return _encoder_flops_and_frames(cfg, batch, steps_in, num_layers)[0]


def _encoder_flops_and_frames(cfg: ModelConfig, batch: int, steps_in: int,
                              num_layers: Optional[int] = None) -> tuple[float, int]:
    """(encoder FLOPs, front-end output steps per utterance): the pretraining heads need the latter too."""
    flops = 0.0
    time_steps, channels = steps_in, (1 if cfg.frontend == "conv" else cfg.n_mels)
    for out_ch, kernel, stride in zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides):
        time_steps = (time_steps - kernel) // stride + 1
        flops += 2 * batch * time_steps * channels * out_ch * kernel
        channels = out_ch
    frames = batch * time_steps
    d, f = cfg.embed_dim, cfg.ffn_dim
    flops += 2 * frames * channels * d  # feature projection
    flops += 2 * frames * d * (d // cfg.pos_conv_groups) * cfg.pos_conv_kernel
    per_layer = 2 * frames * d * 3 * d + 2 * frames * d * d + 4 * frames * d * f + 4 * batch * time_steps ** 2 * d
    return flops + (cfg.num_layers if num_layers is None else num_layers) * per_layer, time_steps


def forward_flops(cfg: ModelConfig, batch: int, steps_in: int, mask_fraction: float = 0.49) -> float:
    """Matrix-multiply FLOPs of one pretraining forward (convs, projections, attention, heads)."""
    flops, time_steps = _encoder_flops_and_frames(cfg, batch, steps_in)
    channels = cfg.conv_channels[-1]
    frames = batch * time_steps
    d = cfg.embed_dim
    masked = mask_fraction * frames
    gv = cfg.codebook_groups * cfg.codebook_entries
    flops += 2 * masked * (d * cfg.final_dim + channels * gv + gv * cfg.codebook_dim / cfg.codebook_groups
                           + cfg.codebook_dim * cfg.final_dim)
    flops += 2 * batch * (masked / batch) ** 2 * cfg.final_dim  # similarity matrices
    return flops


def training_flops(cfg: ModelConfig, batch: int, steps_in: int) -> float:
    """Forward + backward (2x forward), less the input gradient of the first conv (never needed)."""
    first = 2 * batch * ((steps_in - cfg.conv_kernels[0]) // cfg.conv_strides[0] + 1) * cfg.conv_channels[0] * \
        cfg.conv_kernels[0] * (1 if cfg.frontend == "conv" else cfg.n_mels)
    return 3 * forward_flops(cfg, batch, steps_in) - first


# ---------------------------------------------------------------------------------------------------
# training steps
# ---------------------------------------------------------------------------------------------------

def make_batch(cfg: ModelConfig, batch: int, seconds: float, device: str) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(0)
    if cfg.frontend == "conv":
        steps = int(seconds * SAMPLE_RATE)
        return (0.1 * torch.randn(batch, steps, generator=g)).to(device), steps
    steps = int(seconds / FBANK_HOP_S)
    return torch.randn(batch, steps, cfg.n_mels, generator=g).to(device), steps


def autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    # The fused AdamW kernel exists for CPU and CUDA in recent torch; both models get the same one.
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-5)


def ours_step(model, opt, inputs, device, dtype) -> Callable[[], dict]:
    def step() -> dict:
        with autocast(device, dtype):
            out = model(inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"masked": out.sample_size}
    return step


def hf_model(cfg: ModelConfig, device: str):
    import transformers

    hf_cfg = config_to_hf(cfg, "Wav2Vec2ForPreTraining")
    hf_cfg.pop("speech_ssl_model")
    config = transformers.Wav2Vec2Config(**{k: v for k, v in hf_cfg.items() if k not in ("model_type",)})
    config._attn_implementation = "sdpa"
    return transformers.Wav2Vec2ForPreTraining(config).to(device).train()


def hf_step(model, opt, inputs, device, dtype) -> tuple[Callable[[], None], Callable[[], dict]]:
    """(prepare, step): prepare draws masks and distractors (numpy, untimed), step trains."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    cfg = model.config
    batch = inputs.shape[0]
    frames = int(model._get_feat_extract_output_lengths(inputs.shape[1]))
    state: dict[str, Any] = {}

    def prepare() -> None:
        mask = _compute_mask_indices((batch, frames), cfg.mask_time_prob, cfg.mask_time_length,
                                     min_masks=cfg.mask_time_min_masks)
        negatives = _sample_negative_indices((batch, frames), cfg.num_negatives, mask)
        state["mask"] = torch.from_numpy(mask).to(device)
        state["neg"] = torch.from_numpy(negatives).to(device)

    def step() -> dict:
        with autocast(device, dtype):
            out = model(inputs, mask_time_indices=state["mask"], sampled_negative_indices=state["neg"])
        masked = int(state["mask"].sum())
        (out.loss / masked).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"masked": masked}

    return prepare, step


def timed(step: Callable[[], dict], device: str) -> tuple[float, dict]:
    """Wall seconds of one step; info gets "cpu_s": process CPU seconds per torch thread (CPU runs).

    On a shared machine wall time includes time spent waiting for a core; CPU time per thread does
    not, so it is the steadier figure of the two (it still includes cache and memory contention)."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    info = step()
    sync(device)
    info["cpu_s"] = (time.process_time() - cpu_start) / torch.get_num_threads()
    return time.perf_counter() - start, info


# ---------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------

def compare_base(args, rate: float, dtype: torch.dtype) -> dict:
    cfg = build("base").config
    inputs, steps_in = make_batch(cfg, args.batch, args.seconds, args.device)
    audio = args.batch * args.seconds
    flops = training_flops(cfg, args.batch, steps_in)
    torch.manual_seed(0)
    ours = build("base").to(args.device).train()
    if args.compile:
        ours.encoder.context = torch.compile(ours.encoder.context)
    runs: dict[str, dict[str, Any]] = {"ours": {"step": ours_step(ours, optimizer(ours, args.device), inputs,
                                                                  args.device, dtype), "prepare": None}}
    if not args.no_hf:
        try:
            theirs = hf_model(cfg, args.device)
            prepare, step = hf_step(theirs, optimizer(theirs, args.device), inputs, args.device, dtype)
            runs["transformers"] = {"step": step, "prepare": prepare}
        except ImportError:
            print("transformers is not installed: comparison skipped")
    for name, run in runs.items():
        run["times"], run["masked"], run["cpu"] = [], [], []
    rates = [rate]
    for i in range(args.warmup + args.steps):
        if args.device == "cpu":  # the machine's rate between steps: the best sample is the reference
            rates.append(matmul_rate(args.device, dtype, seconds=0.5))
        for name, run in runs.items():
            if run["prepare"]:
                run["prepare"]()
            seconds, info = timed(run["step"], args.device)
            if i >= args.warmup:
                run["times"].append(seconds)
                run["masked"].append(info["masked"])
                run["cpu"].append(info["cpu_s"])
            print(f"  step {i} {name:>12}: {seconds:7.2f} s wall, {info['cpu_s']:7.2f} s CPU per thread"
                  f"{'  (warm-up)' if i < args.warmup else ''}", flush=True)
    rate = max(rates)
    result = {"audio_seconds_per_step": audio, "model_tflops_per_step": flops / 1e12,
              "matmul_gflops_samples": [r / 1e9 for r in rates], "matmul_gflops_best": rate / 1e9}
    for name, run in runs.items():
        median = statistics.median(run["times"])
        cpu = statistics.median(run["cpu"])
        result[name] = {"median_step_s": median, "audio_s_per_s": audio / median,
                        "median_cpu_s_per_thread": cpu, "audio_s_per_cpu_s": audio / cpu, "cpu_steps": run["cpu"],
                        "mean_step_s": statistics.mean(run["times"]), "steps": run["times"],
                        "masked_frames_mean": statistics.mean(run["masked"]),
                        "model_flops_per_s": flops / median, "fraction_of_matmul_rate": flops / median / rate,
                        "fraction_of_matmul_rate_cpu_time": flops / cpu / rate}
    if "transformers" in result:
        result["speedup"] = result["ours"]["audio_s_per_s"] / result["transformers"]["audio_s_per_s"]
        result["speedup_cpu_time"] = result["ours"]["audio_s_per_cpu_s"] / result["transformers"]["audio_s_per_cpu_s"]
        pairs = [t / o for o, t in zip(runs["ours"]["times"], runs["transformers"]["times"])]
        result["speedup_per_pair"] = pairs
    return result


def _status_mb(field: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status in MB (Linux), or -1."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _preset_worker(preset: str, args_dict: dict, queue) -> None:
    args = argparse.Namespace(**args_dict)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = build(preset).to(args.device).train()
    cfg = model.config
    inputs, steps_in = make_batch(cfg, args.batch, args.seconds, args.device)
    step = ours_step(model, optimizer(model, args.device), inputs, args.device, dtype)
    rss_before = _status_mb("VmRSS")
    _reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for i in range(args.warmup + max(args.steps, 3)):
        seconds, info = timed(step, args.device)
        if i >= args.warmup:
            times.append(seconds)
            cpu.append(info["cpu_s"])
    median = statistics.median(times)
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "median_step_s": median, "audio_s_per_s": args.batch * args.seconds / median,
           "median_cpu_s_per_thread": statistics.median(cpu),
           "audio_s_per_cpu_s": args.batch * args.seconds / statistics.median(cpu),
           "model_flops_per_s": training_flops(cfg, args.batch, steps_in) / median,
           "peak_rss_mb": _status_mb("VmHWM"), "rss_before_steps_mb": rss_before}
    if args.device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    queue.put(out)


def measure_preset(preset: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_preset_worker, args=(preset, vars(args), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def profile_ours(args, dtype: torch.dtype) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build(args.profile_preset).to(args.device).train()
    inputs, _ = make_batch(model.config, args.batch, args.seconds, args.device)
    step = ours_step(model, optimizer(model, args.device), inputs, args.device, dtype)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        timed(step, args.device)
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    Path(args.profile).write_text(table)
    print(table)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="base,tiny,fbank-tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--compile", action="store_true", help="torch.compile our context network")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of one step of ours here")
    parser.add_argument("--profile-preset", default="base")
    parser.add_argument("--json", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.profile:
        profile_ours(args, dtype)
        return

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}, {args.dtype}")
    rate = matmul_rate(args.device, dtype)
    print(f"matmul rate: {rate / 1e9:.0f} GFLOP/s ({args.dtype})")
    results: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                               "matmul_gflops": rate / 1e9, "batch": args.batch, "seconds": args.seconds}
    presets = [p for p in args.presets.split(",") if p]
    if "base" in presets:
        print(f"base, {args.batch} x {args.seconds:g} s, forward + backward + AdamW, alternating:")
        results["base"] = base = compare_base(args, rate, dtype)
        print(f"  matmul rate samples between steps: "
              + ", ".join(f"{r:.0f}" for r in base["matmul_gflops_samples"])
              + f" GFLOP/s; best {base['matmul_gflops_best']:.0f}")
        print(f"  model FLOPs per step: {base['model_tflops_per_step']:.3f} TFLOP "
              f"({base['model_tflops_per_step'] * 1e12 / base['audio_seconds_per_step'] / 1e9:.1f} GFLOP per audio s)")
        for name in ("ours", "transformers"):
            if name in base:
                r = base[name]
                print(f"  {name:>12}: {r['audio_s_per_s']:.2f} audio-s/s (median step {r['median_step_s']:.2f} s wall, "
                      f"{r['median_cpu_s_per_thread']:.2f} s CPU per thread: {r['audio_s_per_cpu_s']:.2f} audio-s per "
                      f"CPU-s), {r['model_flops_per_s'] / 1e9:.0f} GFLOP/s = {100 * r['fraction_of_matmul_rate']:.0f}% "
                      f"of the best matmul rate ({100 * r['fraction_of_matmul_rate_cpu_time']:.0f}% by CPU time), "
                      f"{r['masked_frames_mean']:.0f} masked frames")
        if "speedup" in base:
            print(f"  speedup (ours / transformers): {base['speedup']:.2f}x by median wall time, "
                  f"{base['speedup_cpu_time']:.2f}x by median CPU time; per alternating pair: "
                  + ", ".join(f"{p:.2f}" for p in base["speedup_per_pair"]))
    for preset in presets:
        if preset == "base":
            continue
        r = measure_preset(preset, args)
        results[preset] = r
        print(f"{preset}: {r['params_m']:.1f} M params, {r['audio_s_per_s']:.1f} audio-s/s "
              f"(median step {r['median_step_s']:.3f} s wall; {r['audio_s_per_cpu_s']:.1f} audio-s per CPU-s per "
              f"thread), {r['model_flops_per_s'] / 1e9:.0f} GFLOP/s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB during the steps ({r['rss_before_steps_mb']:.0f} MB with the "
              f"model and batch built, before the first step)"
              + (f", peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
