"""Ingest throughput: the Ray Data pipeline against a plain single-process loop doing the same work.

Work per utterance: decode (soundfile), downmix, resample to 16 kHz (torchaudio; a no-op for 16 kHz
sources), 80-bin Kaldi fbank (torchaudio). The pipeline also buckets, pads and collates batches and
hands them to this process as tensors, as a training worker receives them.

Figures, side by side in one run (each Ray configuration in a fresh subprocess with its own Ray):

* ``plain``: a for-loop over the files in one process (soundfile + torchaudio only, none of our code),
  with one torch thread (the reference; ``--default-threads`` adds torch's default);
* ``ray N cpu``: ``BatchStream(use_ray=True)`` on a local Ray of N CPUs; epoch 0 (cold: worker processes
  start and import torch) and epoch 1 (warm: what every later epoch of a training run costs);
* audio-s per CPU-second of the whole process tree (load-independent: what the work costs);
* peak memory of each run: the whole process tree (driver, GCS, raylet, workers), summed PSS (each shared
  page counted once) and summed RSS (shared pages counted in every process);
* ``plain x2``: two plain one-thread loops side by side on half the files each, the ceiling of what two
  CPUs of this machine give (when 2 CPUs are benchmarked; ``--no-ceiling`` skips it);
* optionally (``--train-rate``) what one training worker consumes: audio-s/s of forward + backward of the
  tiny pretraining model on the same machine.

    .venv/bin/python benchmarks/bench_ingest.py                       # 1 h subset, 1 and 2 CPUs
    .venv/bin/python benchmarks/bench_ingest.py --hours 0 --cpus 1 2  # the whole 4.5 h corpus
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "shared/data/tts-harvard/unlabeled.jsonl"


# ---------------------------------------------------------------------------------------------------
# Memory of a process tree, from /proc (no psutil needed)
# ---------------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _mem_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in kB of one process (0, 0 if it is gone)."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def cpu_ticks(stat_path: str) -> int:
    """User + system CPU clock ticks of a process or thread from its ``stat`` file (-1 if it is gone)."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return -1


def tree_cpu_seconds() -> float:
    """User + system CPU seconds used so far by this process and its live descendants (load-independent)."""
    ticks = (cpu_ticks(f"/proc/{pid}/stat") for pid in _tree(os.getpid()))
    return sum(t for t in ticks if t > 0) / os.sysconf("SC_CLK_TCK")


def _role(pid: int) -> str:
    """What a process of the tree is, from its (Ray-set) title: where the CPU of a Ray run goes."""
    if pid == os.getpid():
        return "consumer (this process)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for key, role in (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("Feeder", "feeder actor"),
                      ("ray::", "Ray Data task workers")):
        if key in title:
            return role
    return "other Ray helpers (log monitor, agents)"


def tree_cpu_by_role() -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds so far) over this process and its live descendants.

    Ray Data task workers are split into their main threads (where the tasks run: decoding, fbank, packing)
    and their other threads (Ray's core worker: RPC, object transfer, metrics) under a pseudo-pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in _tree(os.getpid()):
        role = _role(pid)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        main = other = 0
        for tid in threads:
            ticks = cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
            if ticks < 0:
                continue
            if int(tid) == pid:
                main += ticks
            else:
                other += ticks
        if role == "Ray Data task workers":
            out[pid] = (role + ", main threads", main / tick)
            out[-pid] = (role + ", Ray's other threads", other / tick)
        else:
            out[pid] = (role, (main + other) / tick)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role spent between two ``tree_cpu_by_role`` snapshots (a process's latest title wins;
    task workers' titles change with the task they run)."""
    roles: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        if role == "gone" and pid in before:
            role = before[pid][0]
        roles[role] = roles.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    return dict(sorted(roles.items(), key=lambda kv: -kv[1]))


class TreeMemory:
    """Samples the summed PSS/RSS of this process and all its descendants every ``interval`` seconds.

    Reading smaps_rollup costs the kernel tens of ms per sweep: the sampler's own CPU time is kept in
    ``cpu_seconds`` so that it can be left out of the run's CPU figures.
    """

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_pss, self.peak_rss = interval, 0, 0
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.thread_time()
            pss = rss = 0
            for pid in _tree(os.getpid()):
                p, r = _mem_kb(pid)
                pss, rss = pss + p, rss + r
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.cpu_seconds += time.thread_time() - t0
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------------

def load_subset(manifest: str, hours: float, seed: int = 0):
    import random

    from speech_ssl.data import read_source

    utts = list(read_source(manifest))
    if hours and hours > 0:
        random.Random(seed).shuffle(utts)
        kept, total = [], 0.0
        for u in utts:
            if total >= hours * 3600:
                break
            kept.append(u)
            total += u.duration
        utts = kept
    return utts


def run_plain(manifest: str, hours: float, threads: int | None, part: str = "", kind: str = "fbank") -> dict:
    """The reference: a plain loop, soundfile + torchaudio, in this process (``part`` "k/n": every n-th file
    from the k-th, for the two-process ceiling; ``kind`` "waveform" stops after resampling)."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio

    if threads:
        torch.set_num_threads(threads)
    utts = load_subset(manifest, hours)
    if part:
        k, n = map(int, part.split("/"))
        utts = utts[k::n]
    seconds = 0.0
    with TreeMemory() as mem:
        t0, c0, m0 = time.perf_counter(), tree_cpu_seconds(), mem.cpu_seconds
        for u in utts:
            samples, rate = sf.read(u.path, dtype="float32", always_2d=True)
            wave = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
            if rate != 16000:
                wave = torchaudio.functional.resample(wave, rate, 16000)
            if kind == "fbank":
                with torch.inference_mode():
                    torchaudio.compliance.kaldi.fbank(wave[None] * 32768, num_mel_bins=80, sample_frequency=16000,
                                                      dither=0.0)
            seconds += u.duration
        wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0 - (mem.cpu_seconds - m0)
    return {"run": f"plain ({torch.get_num_threads()} torch threads)", "audio_s": seconds, "wall_s": wall,
            "rate": seconds / wall, "cpu_rate": seconds / cpu, "peak_pss_mb": mem.peak_pss / 1024,
            "peak_rss_mb": mem.peak_rss / 1024}


def run_ray(manifest: str, hours: float, cpus: int, batch_seconds: float, epochs: int,
            consumer_rate: float = 0.0, batches_per_task: int = 0, reader_cpus: float = 0.0) -> dict:
    import ray

    from speech_ssl.data import BatchStream, DataConfig, FeatureSpec

    utts = load_subset(manifest, hours)
    duration = {u.id: u.duration for u in utts}
    paced = f", consumer paced at {consumer_rate:g} audio-s/s" if consumer_rate else ""
    data = DataConfig(batch_seconds=batch_seconds)
    if batches_per_task:
        data.batches_per_task = batches_per_task
    if reader_cpus:
        data.num_cpus_per_reader = reader_cpus
    results = {"run": f"ray data, {cpus} CPU, {data.batches_per_task} batches per task, "
                      f"{data.num_cpus_per_reader:g} CPU per decode task{paced}", "epochs": []}
    with TreeMemory() as mem:
        ray.init(address="local", num_cpus=cpus, object_store_memory=400 << 20, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        stream = BatchStream(utts, data, FeatureSpec("fbank", n_mels=80), "pad", use_ray=True)
        for epoch in range(epochs):
            seconds, batches = 0.0, 0
            t0, c0, m0, r0 = time.perf_counter(), tree_cpu_seconds(), mem.cpu_seconds, tree_cpu_by_role()
            for batch in stream.iter_epoch(epoch):
                seconds += sum(duration[i] for i in batch.ids)
                batches += 1
                if consumer_rate:  # a training worker that needs this long for the batch
                    time.sleep(max(0.0, seconds / consumer_rate - (time.perf_counter() - t0)))
            wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0 - (mem.cpu_seconds - m0)
            roles = cpu_by_role(r0, tree_cpu_by_role())
            roles["consumer (this process)"] -= mem.cpu_seconds - m0  # the memory sampler is not the consumer
            results["epochs"].append({"epoch": epoch, "audio_s": seconds, "wall_s": wall, "rate": seconds / wall,
                                      "cpu_rate": seconds / cpu, "batches": batches, "cpu_s_by_role": roles})
        results["padding_waste"] = stream.report.padding_waste
        results["report"] = stream.report.summary_line("bench")
        ray.shutdown()
    results["peak_pss_mb"], results["peak_rss_mb"] = mem.peak_pss / 1024, mem.peak_rss / 1024
    return results


def run_plain_pair(common: list[str]) -> dict:
    """The machine's ceiling for two CPUs: two plain one-thread loops side by side, each on half the files.

    Two cores of a VM need not give twice one core's speed (shared physical cores, memory bandwidth, turbo),
    so this is what *any* 2-CPU pipeline could reach here, measured, not assumed.
    """
    args = [["--child", "plain", "--threads", "1", "--part", f"{k}/2", *common] for k in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for a in args]
    parts = []
    for a, proc in zip(args, procs):
        out, err = proc.communicate(timeout=1800)
        parts.append(_child_result(a, out, err, proc.returncode))
    audio = sum(p["audio_s"] for p in parts)
    wall = max(p["wall_s"] for p in parts)
    return {"run": "plain x2 (two one-thread loops side by side, half the files each)", "audio_s": audio,
            "wall_s": wall, "rate": audio / wall, "cpu_rate": audio / sum(p["audio_s"] / p["cpu_rate"] for p in parts),
            "peak_pss_mb": sum(p["peak_pss_mb"] for p in parts), "peak_rss_mb": sum(p["peak_rss_mb"] for p in parts)}


def run_train_rate(steps: int = 6) -> dict:
    """Audio-s/s of forward + backward of the tiny pretraining model (what one training worker consumes)."""
    import torch

    from speech_ssl.models import build

    torch.manual_seed(0)
    model = build("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, seconds = 8, 5.0
    waves = torch.randn(batch, int(seconds * 16000))
    lengths = torch.full((batch,), waves.shape[1], dtype=torch.long)
    for _ in range(2):  # warm-up
        out = model(waves, lengths)
        (out.loss_sum / max(1, int(out.sample_size))).backward()
        opt.step()
        opt.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(waves, lengths)
        (out.loss_sum / max(1, int(out.sample_size))).backward()
        opt.step()
        opt.zero_grad()
    wall = time.perf_counter() - t0
    return {"run": "tiny model forward+backward", "rate": steps * batch * seconds / wall}


def _child_result(args: list[str], stdout: str, stderr: str, returncode: int = 0) -> dict:
    """A benchmark child's result: the last JSON line of its output (an error without one, or on ``returncode``)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode or not lines:
        raise RuntimeError(f"benchmark child {args} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return json.loads(lines[-1])


def _child(args: list[str], script: str = __file__) -> dict:
    """Run a benchmark script (this one by default) as a child process and return its result."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=1800)
    return _child_result(args, out.stdout, out.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--hours", type=float, default=1.0, help="random subset of this many hours (0: all)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-seconds", type=float, default=40.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--default-threads", action="store_true",
                        help="also run the plain loop with torch's default threads (slow when the machine is busy)")
    parser.add_argument("--train-rate", action="store_true", help="also measure the tiny model's consumption")
    parser.add_argument("--consumer-rate", type=float, default=0.0,
                        help="also run 2 CPUs with a consumer that takes this many audio-s/s (memory stays bounded)")
    parser.add_argument("--child", choices=["plain", "ray", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)
    parser.add_argument("--batches-per-task", type=int, nargs="+", default=[0],
                        help="data.batches_per_task of the Ray runs, each value a run (0: the default)")
    parser.add_argument("--reader-cpus", type=float, nargs="+", default=[0.0],
                        help="data.num_cpus_per_reader of the Ray runs, each value a run (0: the default)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the two-process plain ceiling (measured when 2 CPUs are benchmarked)")
    args = parser.parse_args()

    if args.child == "plain":
        print(json.dumps(run_plain(args.manifest, args.hours, args.threads or None, args.part)))
        return
    if args.child == "ray":
        print(json.dumps(run_ray(args.manifest, args.hours, args.cpus[0], args.batch_seconds, args.epochs,
                                 args.consumer_rate, args.batches_per_task[0], args.reader_cpus[0])))
        return
    if args.child == "train":
        print(json.dumps(run_train_rate()))
        return

    if not Path(args.manifest).exists():
        print(f"skipped: {args.manifest} not found (the shared corpora are not on this machine)")
        return
    common = ["--manifest", args.manifest, "--hours", str(args.hours)]
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    # The reference is the plain loop on one thread (one CPU's worth of work, and stable on a shared machine:
    # torch's two-thread fbank collapses when another process holds a core).
    plain = _child(["--child", "plain", "--threads", "1", *common])
    rows = [plain] + ([_child(["--child", "plain", *common])] if args.default_threads else [])
    if 2 in args.cpus and not args.no_ceiling:
        rows.append(run_plain_pair(common))
    for r in rows:
        print(f"{r['run']}: {r['audio_s']:.0f} audio-s in {r['wall_s']:.1f} s = {r['rate']:.0f} audio-s/s "
              f"= {r['rate'] / plain['rate']:.2f}x plain ({r['cpu_rate']:.0f} audio-s per CPU-s); "
              f"peak {r['peak_pss_mb']:.0f} MB PSS", flush=True)
    runs = [(cpus, 0.0, per_task, reader) for cpus in args.cpus for per_task in args.batches_per_task
            for reader in args.reader_cpus] + \
        ([(2, args.consumer_rate, args.batches_per_task[0], args.reader_cpus[0])] if args.consumer_rate else [])
    for cpus, rate, per_task, reader in runs:
        res = _child(["--child", "ray", "--cpus", str(cpus), "--batch-seconds", str(args.batch_seconds),
                      "--epochs", str(args.epochs), "--consumer-rate", str(rate), "--batches-per-task",
                      str(per_task), "--reader-cpus", str(reader), *common])
        rows.append(res)
        for e in res["epochs"]:
            print(f"{res['run']}, epoch {e['epoch']} ({'cold' if e['epoch'] == 0 else 'warm'}): "
                  f"{e['audio_s']:.0f} audio-s in {e['wall_s']:.1f} s = {e['rate']:.0f} audio-s/s = "
                  f"{e['rate'] / plain['rate']:.2f}x plain ({e['cpu_rate']:.0f} audio-s per CPU-s of the whole "
                  f"process tree = {e['cpu_rate'] / plain['cpu_rate']:.2f}x plain's)", flush=True)
            plain_cpu = e["audio_s"] / plain["cpu_rate"]  # what the plain loop needs for the same audio
            print("    CPU seconds by process: " + ", ".join(
                f"{role} {cpu:.1f}" for role, cpu in e["cpu_s_by_role"].items() if abs(cpu) >= 0.05)
                + f" (the plain loop: {plain_cpu:.1f} for the same audio)", flush=True)
        print(f"  peak memory of the whole run: {res['peak_pss_mb']:.0f} MB PSS ({res['peak_rss_mb']:.0f} MB "
              f"summed RSS); padding waste {100 * res['padding_waste']:.1f}%; {res['report']}", flush=True)
    again = _child(["--child", "plain", "--threads", "1", *common])  # load on a shared machine drifts
    rows.append(again)
    print(f"{again['run']}, again after the Ray runs: {again['rate']:.0f} audio-s/s "
          f"({again['rate'] / plain['rate']:.2f}x the first: the drift of the machine's load)", flush=True)
    if args.train_rate:
        train = _child(["--child", "train"])
        rows.append(train)
        print(f"{train['run']}: {train['rate']:.0f} audio-s/s (one training worker's consumption)", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
