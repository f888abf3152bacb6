"""Pretraining step throughput of speech_ssl's wav2vec 2.0 against transformers, side by side.

One training step = forward + backward + AdamW step on the same batch (default 4 x 6 s of audio).
`base` runs against transformers' Wav2Vec2ForPreTraining built with the identical configuration (same
sizes, dropouts, LayerDrop, mask probability / span / minimum, K distractors, codebook, diversity
weight). The two are timed in alternation (ours, theirs, ours, ...) so that load from other processes
falls on both; transformers' masks and distractor indices are drawn outside its timed region (its data
collator's job), ours inside (they are part of our forward).

Precision (``--dtype auto``, the default, resolved by ``speech_ssl.precision``): bf16 autocast on GPUs;
on CPUs bf16 where the CPU has native bf16 dot products (AMX, avx512_bf16), else fp32. The CPU is named
with its bf16 support. Where a CPU run resolves to bf16, each side runs in fp32 and in bf16 (four arms,
alternating), so ours is compared against transformers' best configuration on the machine and against our
own fp32.

Also reported: this machine's matmul rate in each precision (measured in the same run), the model FLOPs
we count per step and the fraction of the matmul rate each arm reaches; on GPUs the step at the recipe's
batch (6 x 14.58 s = 87.5 s of audio per GPU, ``--recipe-batch``, on by default there) and each arm's
peak GPU memory; with ``--compile`` ours is compiled as the training loop compiles it
(``speech_ssl.models.compile``: region by region, each a whole graph) and dynamo's graph count is printed; for `tiny` and `fbank-tiny` throughput and
peak memory (each measured in a fresh process).

    python benchmarks/bench_model.py                       # CPU, auto precision: base vs transformers + tiny presets
    python benchmarks/bench_model.py --presets tiny,fbank-tiny --no-hf
    python benchmarks/bench_model.py --device cuda --batch 16 --steps 10 --presets base     # GPU, bf16
    python benchmarks/bench_model.py --device cuda --batch 16 --steps 10 --presets base --compile
    python benchmarks/bench_model.py --presets tiny --compare tiny --recipe-batch --compile --steps 1  # dry run
    python benchmarks/bench_model.py --profile prof.txt    # torch.profiler table of one step of ours

Runs without Ray, and imports with torch alone. Needs transformers for the comparison (skipped with a
note when missing).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech_ssl.models import ModelConfig, build, build_config  # noqa: E402
from speech_ssl.models.convert import config_to_hf  # noqa: E402
from speech_ssl.precision import cpu_bf16_features, describe_cpu, resolve_precision  # noqa: E402

SAMPLE_RATE = 16000
FBANK_HOP_S = 0.01
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECIPE_BATCH = (6, 87.5 / 6)  # conf/run/recipe/gpu_base.yaml: batch_seconds 87.5 per GPU, crops of ~15 s


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
        return {"masked": out.num_masked}  # read after the step is timed, like the loop reads it after backward
    return step


def hf_model(cfg: ModelConfig, device: str):
    import transformers

    hf_cfg = config_to_hf(cfg, "Wav2Vec2ForPreTraining")
    hf_cfg.pop("speech_ssl_model")
    config = transformers.Wav2Vec2Config(**{k: v for k, v in hf_cfg.items() if k not in ("model_type",)})
    config._attn_implementation = "sdpa"
    return transformers.Wav2Vec2ForPreTraining(config).to(device).train()


def hf_step(model, opt, inputs, device) -> tuple[Callable[[], None], Callable[[torch.dtype], Callable[[], dict]]]:
    """(prepare, step_for): prepare draws masks and distractors (numpy, untimed); step_for(dtype) trains."""
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

    def step_for(dtype: torch.dtype) -> Callable[[], dict]:
        def step() -> dict:
            with autocast(device, dtype):
                out = model(inputs, mask_time_indices=state["mask"], sampled_negative_indices=state["neg"])
            masked = int(state["mask"].sum())
            (out.loss / masked).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return {"masked": masked}
        return step

    return prepare, step_for


def timed(step: Callable[[], dict], device: str) -> tuple[float, dict]:
    """Wall seconds of one step; info gets "cpu_s": process CPU seconds per torch thread (CPU runs) and, on
    GPUs, "peak_bytes": the most memory allocated during the step beyond what was allocated before it.

    On a shared machine wall time includes time spent waiting for a core; CPU time per thread does
    not, so it is the steadier figure of the two (it still includes cache and memory contention)."""
    sync(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start, cpu_start = time.perf_counter(), time.process_time()
    info = step()
    sync(device)
    info["cpu_s"] = (time.process_time() - cpu_start) / torch.get_num_threads()
    if cuda:
        info["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    return time.perf_counter() - start, info


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes a model keeps between steps: parameters and optimizer state (gradients are freed each step)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for per_param in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if torch.is_tensor(v))
    return total


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """Our model compiled as the training loop compiles it (``trainer.compile=true``): region by region,
    each region one whole graph (``speech_ssl.models.compile``; a graph break there is an error)."""
    from speech_ssl.models.compile import compile_model as compile_regions

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return compile_regions(model)


def graph_breaks() -> dict:
    """What dynamo reported since ``compile_model``: graph breaks by reason, and the graphs it compiled."""
    counters = torch._dynamo.utils.counters
    breaks = {str(reason): int(n) for reason, n in counters["graph_break"].items()}
    return {"graph_breaks": sum(breaks.values()), "break_reasons": breaks,
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0))}


# ---------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------

def compare(args, preset: str, batch: int, seconds: float, precisions: list[str],
            rates: dict[str, float]) -> dict:
    """Ours against transformers (identical configuration) on one batch, in each of ``precisions``,
    all arms timed in alternation. ``rates``: matmul FLOP/s per precision (CPU runs sample more)."""
    cfg = build_config(preset)
    inputs, steps_in = make_batch(cfg, batch, seconds, args.device)
    audio = batch * seconds
    flops = training_flops(cfg, batch, steps_in)
    torch.manual_seed(0)
    ours = build(preset).to(args.device).train()
    ours_opt = optimizer(ours, args.device)
    runnable = compile_model(ours) if args.compile else ours
    models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {"ours": (ours, ours_opt)}
    arms: dict[str, dict[str, Any]] = {}
    for prec in precisions:
        arms[f"ours-{prec}"] = {"impl": "ours", "precision": prec, "prepare": None,
                                "step": ours_step(runnable, ours_opt, inputs, args.device, DTYPES[prec])}
    if not args.no_hf:
        try:
            theirs = hf_model(cfg, args.device)
            theirs_opt = optimizer(theirs, args.device)
            prepare, step_for = hf_step(theirs, theirs_opt, inputs, args.device)
            models["transformers"] = (theirs, theirs_opt)
            for prec in precisions:
                arms[f"transformers-{prec}"] = {"impl": "transformers", "precision": prec, "prepare": prepare,
                                                "step": step_for(DTYPES[prec])}
        except ImportError as err:
            print(f"  transformers is not installed ({err}): comparison skipped")
    for arm in arms.values():
        arm["times"], arm["masked"], arm["cpu"], arm["peak"] = [], [], [], []
    samples: dict[str, list[float]] = {prec: [rates[prec]] for prec in precisions}
    errors: dict[str, str] = {}
    for i in range(args.warmup + args.steps):
        if args.device == "cpu":  # the machine's rate between steps: the best sample is the reference
            for prec in precisions:
                samples[prec].append(matmul_rate(args.device, DTYPES[prec], seconds=0.5))
        for name, arm in arms.items():
            if arm["prepare"]:
                arm["prepare"]()
            try:
                step_s, info = timed(arm["step"], args.device)
            except Exception as err:  # e.g. a kernel without bf16 support: report, keep the other arms
                print(f"  step {i} {name:>18}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
                errors[name] = f"{type(err).__name__}: {err}"
                continue
            if i >= args.warmup:
                arm["times"].append(step_s)
                arm["masked"].append(int(info["masked"]))
                arm["cpu"].append(info["cpu_s"])
            if "peak_bytes" in info:
                arm["peak"].append(info["peak_bytes"])
            print(f"  step {i} {name:>18}: {step_s:7.3f} s wall, {info['cpu_s']:7.3f} s CPU per thread"
                  f"{'  (warm-up)' if i < args.warmup else ''}", flush=True)
        for name in errors:
            arms.pop(name, None)
    best_rate = {prec: max(v) for prec, v in samples.items()}
    result: dict[str, Any] = {"preset": preset, "batch": batch, "seconds": seconds,
                              "audio_seconds_per_step": audio, "model_tflops_per_step": flops / 1e12,
                              "matmul_gflops_samples": {p: [r / 1e9 for r in v] for p, v in samples.items()},
                              "matmul_gflops_best": {p: r / 1e9 for p, r in best_rate.items()},
                              "compiled": bool(args.compile), "arms": {}, "errors": errors}
    if args.compile:
        result["ours_compile"] = graph_breaks()
    for name, arm in arms.items():
        if not arm["times"]:
            continue
        median = statistics.median(arm["times"])
        cpu = statistics.median(arm["cpu"])
        rate = best_rate[arm["precision"]]
        r = {"impl": arm["impl"], "precision": arm["precision"], "median_step_s": median,
             "audio_s_per_s": audio / median, "median_cpu_s_per_thread": cpu, "audio_s_per_cpu_s": audio / cpu,
             "cpu_steps": arm["cpu"], "mean_step_s": statistics.mean(arm["times"]), "steps": arm["times"],
             "masked_frames_mean": statistics.mean(arm["masked"]), "model_flops_per_s": flops / median,
             "fraction_of_matmul_rate": flops / median / rate, "fraction_of_matmul_rate_cpu_time": flops / cpu / rate}
        if arm["peak"]:
            model, opt = models[arm["impl"]]
            kept = state_bytes(model, opt)
            # Both models live on the GPU at once: each arm's peak is its own weights and optimizer state
            # plus the most its step allocated beyond what was allocated before the step.
            r["peak_gpu_mb"] = (kept + max(arm["peak"])) / 2 ** 20
            r["weights_and_optimizer_mb"] = kept / 2 ** 20
        result["arms"][name] = r
    result["ratios"] = ratios(result["arms"], arms)
    return result


def ratios(measured: dict[str, dict], arms: dict[str, dict]) -> dict[str, Any]:
    """ours / transformers per precision and best against best (wall time, and CPU time); on CPUs also
    ours in bf16 against ours in fp32."""
    out: dict[str, Any] = {}

    def ratio(a: str, b: str, key: str) -> Optional[float]:
        return measured[a][key] / measured[b][key] if a in measured and b in measured else None

    precisions = sorted({r["precision"] for r in measured.values()})
    for prec in precisions:
        a, b = f"ours-{prec}", f"transformers-{prec}"
        if a in measured and b in measured:
            out[f"ours/transformers {prec}"] = ratio(a, b, "audio_s_per_s")
            out[f"ours/transformers {prec} (CPU time)"] = ratio(a, b, "audio_s_per_cpu_s")
            out[f"ours/transformers {prec} per pair"] = [t / o for o, t in zip(arms[a]["times"], arms[b]["times"])]
    if len(precisions) > 1:
        best = {impl: max((n for n, r in measured.items() if r["impl"] == impl),
                          key=lambda n: measured[n]["audio_s_per_s"], default=None)
                for impl in ("ours", "transformers")}
        if best["ours"] and best["transformers"]:
            out["best"] = {"ours": best["ours"], "transformers": best["transformers"],
                           "ratio": ratio(best["ours"], best["transformers"], "audio_s_per_s"),
                           "ratio_cpu_time": ratio(best["ours"], best["transformers"], "audio_s_per_cpu_s")}
        if "ours-bf16" in measured and "ours-fp32" in measured:
            out["ours bf16/ours fp32"] = ratio("ours-bf16", "ours-fp32", "audio_s_per_s")
            out["ours bf16/ours fp32 (CPU time)"] = ratio("ours-bf16", "ours-fp32", "audio_s_per_cpu_s")
    return out


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
    dtype = DTYPES[args.dtype]
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
    opt = optimizer(model, args.device)
    step = ours_step(compile_model(model) if args.compile else model, opt, inputs, args.device, dtype)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        timed(step, args.device)
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    Path(args.profile).write_text(table)
    print(table)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="base,tiny,fbank-tiny")
    parser.add_argument("--compare", default="base",
                        help="presets (of --presets) run side by side with transformers; the others run alone")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--recipe-batch", action=argparse.BooleanOptionalAction, default=None,
                        help=f"also compare at the recipe's batch ({RECIPE_BATCH[0]} x {RECIPE_BATCH[1]:.2f} s = "
                             "87.5 s of audio per GPU); default: on for GPUs, off for CPUs")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="auto: bf16 on GPUs and on CPUs with native bf16 (then CPUs also run fp32), else fp32")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--compile", action="store_true",
                        help="compile our pretraining model as trainer.compile=true does; prints the "
                             "graph breaks dynamo reports")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of one step of ours here")
    parser.add_argument("--profile-preset", default="base")
    parser.add_argument("--json", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.recipe_batch is None:
        args.recipe_batch = args.device.startswith("cuda")
    return args


def run_precisions(args) -> list[str]:
    """The precisions to compare: the resolved one; on a CPU resolving to bf16, fp32 as well."""
    resolved = resolve_precision(args.dtype, args.device, key="--dtype")
    if args.device == "cpu" and resolved == "bf16":
        return ["fp32", "bf16"]
    return [resolved]


def print_comparison(res: dict) -> None:
    rates = res["matmul_gflops_best"]
    print("  matmul rate samples: " + "; ".join(
        f"{p}: " + ", ".join(f"{r:.0f}" for r in v) + f" GFLOP/s (best {rates[p]:.0f})"
        for p, v in res["matmul_gflops_samples"].items()))
    print(f"  model FLOPs per step: {res['model_tflops_per_step']:.3f} TFLOP "
          f"({res['model_tflops_per_step'] * 1e12 / res['audio_seconds_per_step'] / 1e9:.1f} GFLOP per audio s)")
    if "ours_compile" in res:
        c = res["ours_compile"]
        print(f"  torch.compile(ours): {c['unique_graphs']} graph(s) compiled, {c['graph_breaks']} graph break(s)"
              + "".join(f"\n    {n} x {reason.strip().splitlines()[0][:200] if reason.strip() else '?'}"
                        for reason, n in c["break_reasons"].items()))
    for name, r in res["arms"].items():
        print(f"  {name:>18}: {r['audio_s_per_s']:.2f} audio-s/s (median step {r['median_step_s']:.3f} s wall, "
              f"{r['median_cpu_s_per_thread']:.3f} s CPU per thread: {r['audio_s_per_cpu_s']:.2f} audio-s per "
              f"CPU-s), {r['model_flops_per_s'] / 1e9:.0f} GFLOP/s = {100 * r['fraction_of_matmul_rate']:.1f}% "
              f"of the best {r['precision']} matmul rate ({100 * r['fraction_of_matmul_rate_cpu_time']:.1f}% by CPU "
              f"time), {r['masked_frames_mean']:.0f} masked frames"
              + (f", peak GPU memory {r['peak_gpu_mb']:.0f} MB ({r['weights_and_optimizer_mb']:.0f} MB weights and "
                 f"optimizer state)" if "peak_gpu_mb" in r else ""))
    for name, err in res["errors"].items():
        print(f"  {name:>18}: FAILED ({err[:200]})")
    for key, value in res["ratios"].items():
        if key == "best":
            print(f"  ==> ours best ({value['ours']}) / transformers best ({value['transformers']}): "
                  f"{value['ratio']:.2f}x by median wall time, {value['ratio_cpu_time']:.2f}x by median CPU time")
        elif isinstance(value, list):
            print(f"  {key}: " + ", ".join(f"{v:.2f}" for v in value))
        else:
            print(f"  {key}: {value:.2f}x")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = run_precisions(args)
    main_precision = precisions[-1]
    if args.profile:
        profile_ours(args, DTYPES[main_precision])
        return

    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else describe_cpu()
    print(f"machine: {where}; {torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}, "
          f"--dtype {args.dtype} -> {', '.join(precisions)}")
    if args.device == "cpu":
        print("CPU bf16: " + (f"native ({', '.join(cpu_bf16_features())}): ours and transformers run in fp32 and "
                              "bf16 autocast" if cpu_bf16_features() else "emulated (no native bf16 dot products): "
                              "fp32 is the best configuration here"))
    rates = {}
    for prec in precisions:
        rates[prec] = matmul_rate(args.device, DTYPES[prec])
        print(f"matmul rate: {rates[prec] / 1e9:.0f} GFLOP/s ({prec})")
    results: dict[str, Any] = {"device": args.device, "machine": where, "dtype": args.dtype,
                               "precisions": precisions, "threads": torch.get_num_threads(),
                               "matmul_gflops": {p: r / 1e9 for p, r in rates.items()}, "batch": args.batch,
                               "seconds": args.seconds, "torch": torch.__version__, "comparisons": {}}
    presets = [p for p in args.presets.split(",") if p]
    compared = [p for p in presets if p in args.compare.split(",")]
    batches = [(args.batch, args.seconds)] + ([RECIPE_BATCH] if args.recipe_batch else [])
    for preset in compared:
        for batch, seconds in batches:
            label = f"{preset} {batch}x{seconds:.2f}s"
            print(f"{preset}, {batch} x {seconds:.2f} s = {batch * seconds:.1f} s of audio, forward + backward + "
                  f"AdamW, {'torch.compile(ours), ' if args.compile else ''}alternating:", flush=True)
            if cuda:
                torch.cuda.empty_cache()
            res = compare(args, preset, batch, seconds, precisions, rates)
            results["comparisons"][label] = res
            print_comparison(res)
    for preset in presets:
        if preset in compared:
            continue
        r = measure_preset(preset, argparse.Namespace(**{**vars(args), "dtype": main_precision}))
        results[preset] = r
        print(f"{preset} ({main_precision}): {r['params_m']:.1f} M params, {r['audio_s_per_s']:.1f} audio-s/s "
              f"(median step {r['median_step_s']:.3f} s wall; {r['audio_s_per_cpu_s']:.1f} audio-s per CPU-s per "
              f"thread), {r['model_flops_per_s'] / 1e9:.0f} GFLOP/s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB during the steps ({r['rss_before_steps_mb']:.0f} MB with the "
              f"model and batch built, before the first step)"
              + (f", peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
