"""Feeding a training step: the read path from a decoded-audio cache and from the original files, side by side.

Every figure is of one epoch of batches (40 s of padded audio each, ``pad`` mode, as fine-tuning and
bench_ingest use) handed to a consumer that does nothing but touch the tensors, in a fresh child process:

* ``plain <kind>``: the reference, a plain one-thread loop decoding the same files (soundfile, torchaudio
  resample, and for ``fbank`` the 80-bin Kaldi filterbank; none of our code);
* ``cache <kind>, N CPU``: ``BatchStream`` over a cache written by ``speech-ssl cache`` (int16 PCM for
  ``waveform``, float16 frames for ``fbank``), read by ``data.read_threads=N`` threads of the consuming
  process, which is pinned to N cores (``sched_setaffinity``) so that N CPUs is what it gets;
* ``files fbank, N CPU``: ``BatchStream(use_ray=True)`` over the original Ogg/Opus files on a local Ray of N
  CPUs (bench_ingest's run: cold and warm epochs, CPU by process role);
* with ``--consumer-rate R``: the cache runs again at 2 CPUs (one read thread, the default) for a consumer
  that needs 1/R s per audio-s of a batch (a training step), reporting the share of its time it waited
  for data (``data_wait_fraction``).

Audio-s per CPU-s counts the CPU of the whole process tree (load-independent); audio-s/s is wall-clock.
Peak memory is summed PSS of the tree. The cache's size per hour of audio is printed for each payload.

    .venv/bin/python benchmarks/bench_feed.py                              # 1 h subset, 1 and 2 CPUs
    .venv/bin/python benchmarks/bench_feed.py --hours 0.5 --consumer-rate 3000 --skip-files
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import (DEFAULT_MANIFEST, TreeMemory, _child, load_subset, run_plain,  # noqa: E402
                          tree_cpu_seconds)

PRESET = {"waveform": "tiny", "fbank": "fbank-tiny"}
MIN_SECONDS = 6.0


def cpu_name() -> str:
    flags, name = set(), "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(have) or 'no AVX2'}), {os.cpu_count()} CPUs"


def spec_of(kind: str):
    from speech_ssl.data import FeatureSpec

    return FeatureSpec("fbank", n_mels=80, normalize=True) if kind == "fbank" else FeatureSpec("waveform", normalize=True)


def write_cache(manifest: str, hours: float, kind: str, folder: str) -> dict:
    """The subset as a manifest, cached by ``speech-ssl cache`` (on an embedded Ray of this machine's CPUs)."""
    from speech_ssl.stages import cache

    subset = Path(folder) / f"subset_{kind}.jsonl"
    with open(subset, "w") as f:
        for u in load_subset(manifest, hours):
            f.write(json.dumps({"path": u.path, "duration": u.duration}) + "\n")
    t0 = time.perf_counter()
    meta = cache.run(cache.Config(input=str(subset), output=f"{folder}/cache_{kind}", model=PRESET[kind]))
    return {"run": f"write the {kind} cache", "wall_s": time.perf_counter() - t0, "hours": meta["hours"],
            "mb_per_hour": meta["bytes"] / 1e6 / meta["hours"], "dtype": meta["dtype"]}


def run_cache(folder: str, kind: str, cpus: int, threads: int, epochs: int, consumer_rate: float) -> dict:
    """Epochs of a cached stream into a consumer that touches every batch (and optionally paces itself)."""
    import torch

    from speech_ssl.data import BatchStream, DataConfig, read_source

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    torch.set_num_threads(1)
    data = DataConfig(batch_seconds=40.0, read_threads=threads)
    paced = f", consumer eats {consumer_rate:g} audio-s/s" if consumer_rate else ""
    out = {"run": f"cache {kind}, {cpus} CPU ({threads} read threads){paced}", "epochs": []}
    with TreeMemory() as mem:
        stream = BatchStream(read_source(f"{folder}/cache_{kind}"), data, spec_of(kind), "pad", use_ray=False)
        started = time.perf_counter()
        # Epochs of a small subset take a fraction of a second: repeat until the warm ones add up to some
        # seconds, so that CPU clock ticks (10 ms) do not dominate the figures.
        epoch = 0
        while epoch < epochs or time.perf_counter() - started < MIN_SECONDS:
            seconds = wait = 0.0
            touched = 0.0
            t0, c0, m0 = time.perf_counter(), tree_cpu_seconds(), mem.cpu_seconds
            batches = stream.iter_epoch(epoch)
            while True:
                w0 = time.perf_counter()
                batch = next(batches, None)
                wait += time.perf_counter() - w0
                if batch is None:
                    break
                touched += float(batch.inputs[:, ::97].sum())  # the consumer reads the batch
                seconds += batch.audio_seconds
                if consumer_rate:  # a training step that takes this long for the batch
                    time.sleep(max(0.0, seconds / consumer_rate - (time.perf_counter() - t0)))
            wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0 - (mem.cpu_seconds - m0)
            out["epochs"].append({"epoch": epoch, "audio_s": seconds, "wall_s": wall, "rate": seconds / wall,
                                  "cpu_s": cpu, "data_wait_s": wait})
            epoch += 1
    warm = out["epochs"][1:]
    audio, wall = sum(e["audio_s"] for e in warm), sum(e["wall_s"] for e in warm)
    out["warm"] = {"epochs": len(warm), "audio_s": audio, "rate": audio / wall,
                   "cpu_rate": audio / max(1e-9, sum(e["cpu_s"] for e in warm)),
                   "data_wait_fraction": sum(e["data_wait_s"] for e in warm) / wall}
    out["peak_pss_mb"] = mem.peak_pss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--hours", type=float, default=1.0, help="random subset of this many hours (0: all)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=["fbank", "waveform"], choices=["fbank", "waveform"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--consumer-rate", type=float, default=0.0, help="audio-s/s of a paced consumer (2 CPUs)")
    parser.add_argument("--skip-files", action="store_true", help="skip the Ray runs over the original files")
    parser.add_argument("--json", default="", help="also write every figure (per epoch) to this file")
    parser.add_argument("--child", choices=["plain", "write", "cache"], help=argparse.SUPPRESS)
    parser.add_argument("--read-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    kind = args.kinds[0]
    if args.child == "plain":
        plain = run_plain(args.manifest, args.hours, 1, kind=kind)
        print(json.dumps({**plain, "run": f"plain {kind} (1 thread)"}))
        return
    if args.child == "write":
        print(json.dumps(write_cache(args.manifest, args.hours, kind, args.folder)))
        return
    if args.child == "cache":
        print(json.dumps(run_cache(args.folder, kind, args.cpus[0], args.read_threads, args.epochs, args.consumer_rate)))
        return

    if not Path(args.manifest).exists():
        print(f"skipped: {args.manifest} not found (the shared corpora are not on this machine)")
        return
    common = ["--manifest", args.manifest, "--hours", str(args.hours)]
    print(f"{cpu_name()}; load average before: {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_feed_") as folder:
        for kind in args.kinds:
            plain = _child(["--child", "plain", "--kinds", kind, *common], __file__)
            rows.append(plain)
            print(f"{plain['run']}: {plain['rate']:.0f} audio-s/s ({plain['cpu_rate']:.0f} audio-s per CPU-s)", flush=True)
            made = _child(["--child", "write", "--kinds", kind, "--folder", folder, *common], __file__)
            rows.append(made)
            print(f"{made['run']}: {made['hours']:.2f} h in {made['wall_s']:.1f} s; {made['mb_per_hour']:.0f} MB per "
                  f"hour of audio ({made['dtype']})", flush=True)
            one_cpu = None
            # Scaling: N CPUs, N read threads. The paced consumer: 2 CPUs, the default data.read_threads.
            runs = [(cpus, cpus, 0.0) for cpus in args.cpus] + ([(2, 1, args.consumer_rate)] if args.consumer_rate else [])
            for cpus, threads, rate in runs:
                res = _child(["--child", "cache", "--kinds", kind, "--folder", folder, "--cpus", str(cpus),
                              "--read-threads", str(threads), "--epochs", str(args.epochs), "--consumer-rate", str(rate)],
                             __file__)
                rows.append(res)
                best = res["warm"]
                if cpus == 1 and not rate:
                    one_cpu = best["rate"]
                scale = f"; {best['rate'] / one_cpu:.2f}x the 1-CPU rate" if one_cpu and cpus > 1 and not rate else ""
                wait = f"; data wait {100 * best['data_wait_fraction']:.1f}% of the consumer's time" if rate else ""
                print(f"{res['run']}, {best['epochs']} warm epochs: {best['rate']:.0f} audio-s/s = {best['rate'] / plain['rate']:.1f}x plain, "
                      f"{best['cpu_rate']:.0f} audio-s per CPU-s = {best['cpu_rate'] / plain['cpu_rate']:.1f}x plain's"
                      f"{scale}{wait}; epoch 0 {res['epochs'][0]['rate']:.0f} audio-s/s; peak {res['peak_pss_mb']:.0f} "
                      "MB PSS", flush=True)
    if not args.skip_files:
        ingest = str(Path(__file__).resolve().parent / "bench_ingest.py")
        for cpus in args.cpus:
            res = _child(["--child", "ray", "--cpus", str(cpus), "--batch-seconds", "40", "--epochs", "2",
                          "--consumer-rate", "0", "--batches-per-task", "0", "--reader-cpus", "0", *common], ingest)
            rows.append(res)
            plain = next(r for r in rows if r["run"].startswith("plain fbank"))
            for e in res["epochs"]:
                print(f"files fbank (Ray Data), {cpus} CPU, epoch {e['epoch']}: {e['rate']:.0f} audio-s/s = "
                      f"{e['rate'] / plain['rate']:.2f}x plain ({e['cpu_rate']:.0f} audio-s per CPU-s)", flush=True)
            print(f"  peak {res['peak_pss_mb']:.0f} MB PSS", flush=True)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
