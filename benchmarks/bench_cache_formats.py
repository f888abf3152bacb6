"""On-disk formats for a decoded-audio cache: size, write time and read rate (random and sequential).

The cache stores a corpus once, decoded and resampled, one row per utterance; training reads rows in a
shuffled order, so the random-row read rate matters most. Payloads (from ``speech_ssl.data.audio.decode_file``):

* waveform, 16 kHz mono, stored as int16 PCM (round(x * 32768), clipped) or float32;
* fbank, 80-bin Kaldi log-mel frames (10 ms shift, not normalised), stored as float16 or float32.

Formats, each written to a temp dir from the same pre-decoded float32 arrays (decoding is timed
separately, as the "plain decode loop" reference):

* ``ipc``: Arrow IPC file, uncompressed, one record batch per row (id, duration, steps, data = raw bytes),
  read zero-copy through ``pa.memory_map`` + ``reader.get_batch(k)`` + ``np.frombuffer``;
* ``ipc-zstd``: the same with IPC buffer compression zstd, read through a normally opened file;
* ``parquet-zstd``: Parquet, zstd, row groups of 64 rows; a random row costs reading its whole row group;
* ``ipc-flac``: FLAC (int16 PCM) bytes in the data column of an uncompressed IPC file, decoded on read.

Every read ends in a float32 array (``astype``; int16 divided by 32768), as training consumes it. Figures:
MB per hour of audio, write seconds, read rate in audio-seconds per second on one thread (all rows in a
shuffled order, reshuffled per pass, passes repeated until >= ``--min-time`` s; wall and process CPU time;
the files are in the page cache, i.e. "memory speed"), the same for a sequential scan, and the error of
int16 / float16 storage against float32 (also after per-utterance fbank mean/variance normalisation).

    .venv/bin/python benchmarks/bench_cache_formats.py --minutes 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import soundfile as sf

from speech_ssl.data.audio import FeatureSpec, decode_file, normalize_fbank

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "shared/data/tts-harvard/unlabeled.jsonl"
N_MELS = 80
ROW_GROUP = 64
SCHEMA = pa.schema([("id", pa.string()), ("duration", pa.float64()), ("steps", pa.int64()), ("data", pa.binary())])


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    feats = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512_bf16", "amx_bf16"))
    return f"{model} ({os.cpu_count()} CPUs; {feats})"


def load_manifest(path: Path, minutes: float) -> list[str]:
    files, total = [], 0.0
    for line in path.read_text().splitlines():
        if total >= minutes * 60:
            break
        rec = json.loads(line)
        files.append(str(path.parent / rec["path"]))
        total += float(rec["duration"])
    return files


def decode_all(files: list[str], spec: FeatureSpec) -> tuple[list[np.ndarray], float]:
    """Decoded arrays and the wall seconds the loop took."""
    t0 = time.perf_counter()
    arrays = [decode_file(f, spec) for f in files]
    return arrays, time.perf_counter() - t0


# --- payload encoding -------------------------------------------------------------------------------

def encode(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "int16":
        return np.clip(np.rint(arr * 32768.0), -32768, 32767).astype(np.int16).tobytes()
    if dtype == "flac":
        bio = io.BytesIO()
        sf.write(bio, np.frombuffer(encode(arr, "int16"), np.int16), 16000, format="FLAC", subtype="PCM_16")
        return bio.getvalue()
    return arr.astype(dtype).tobytes()


def decoder(dtype: str, kind: str):
    if dtype == "flac":
        return lambda buf: sf.read(io.BytesIO(buf), dtype="float32")[0]
    shape = (-1, N_MELS) if kind == "fbank" else (-1,)
    if dtype == "int16":
        return lambda buf: (np.frombuffer(buf, np.int16).astype(np.float32) / 32768.0).reshape(shape)
    return lambda buf: np.frombuffer(buf, dtype).astype(np.float32).reshape(shape)


# --- formats: write(path, columns) and a reader with read(k) -> buffer and scan() -> buffers ---------

def write_ipc(path: str, cols: dict, compression: str | None = None) -> None:
    opts = ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(path, "wb") as sink, ipc.new_file(sink, SCHEMA, options=opts) as writer:
        for k in range(len(cols["data"])):
            writer.write_batch(pa.record_batch([[cols[c][k]] for c in SCHEMA.names], schema=SCHEMA))


def write_parquet(path: str, cols: dict) -> None:
    pq.write_table(pa.table(cols, schema=SCHEMA), path, compression="zstd", row_group_size=ROW_GROUP,
                   use_dictionary=False, write_statistics=False)


class IpcRows:
    def __init__(self, path: str, mmap: bool):
        self.reader = ipc.open_file(pa.memory_map(path) if mmap else pa.OSFile(path),
                                    options=ipc.IpcReadOptions(use_threads=False))
        self.n = self.reader.num_record_batches

    def read(self, k: int):
        return self.reader.get_batch(k).column("data")[0].as_buffer()

    def scan(self):
        return (self.read(k) for k in range(self.n))


class ParquetRows:
    def __init__(self, path: str):
        self.pf = pq.ParquetFile(path)
        sizes = [self.pf.metadata.row_group(g).num_rows for g in range(self.pf.num_row_groups)]
        self.starts = list(np.cumsum([0] + sizes[:-1]))
        self.n = sum(sizes)

    def read(self, k: int):
        g = bisect.bisect_right(self.starts, k) - 1
        col = self.pf.read_row_group(g, columns=["data"], use_threads=False).column("data")
        return col[k - self.starts[g]].as_buffer()

    def scan(self):
        for g in range(self.pf.num_row_groups):
            col = self.pf.read_row_group(g, columns=["data"], use_threads=False).column("data")
            yield from (col[i].as_buffer() for i in range(len(col)))


FORMATS = {  # name: (writer, reader factory)
    "ipc": (write_ipc, lambda p: IpcRows(p, mmap=True)),
    "ipc-zstd": (lambda p, c: write_ipc(p, c, "zstd"), lambda p: IpcRows(p, mmap=False)),
    "parquet-zstd": (write_parquet, ParquetRows),
    "ipc-flac": (write_ipc, lambda p: IpcRows(p, mmap=True)),
}


def timed(one_pass, n_rows: int, audio_per_pass: float, min_time: float) -> dict:
    wall0, cpu0, passes = time.perf_counter(), time.process_time(), 0
    while passes == 0 or time.perf_counter() - wall0 < min_time:
        one_pass()
        passes += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"audio_s_per_s": audio_per_pass * passes / wall, "audio_s_per_cpu_s": audio_per_pass * passes / cpu,
            "us_per_row": wall / passes / n_rows * 1e6}


def bench(fmt: str, kind: str, dtype: str, arrays, ids, durs, tmp: str, min_time: float, rng) -> dict:
    write, open_reader = FORMATS[fmt]
    path = os.path.join(tmp, f"{kind}-{dtype}-{fmt}")
    t0 = time.perf_counter()
    cols = {"id": ids, "duration": durs, "steps": [len(a) for a in arrays], "data": [encode(a, dtype) for a in arrays]}
    write(path, cols)
    write_s = time.perf_counter() - t0
    reader, dec, total = open_reader(path), decoder(dtype, kind), sum(durs)
    lossy = {"int16": 1 / 32768, "float16": 0.05, "flac": 1 / 32768}.get(dtype, 0.0)
    assert np.allclose(dec(reader.read(3)), arrays[3], atol=lossy, rtol=1e-3), f"{fmt}/{dtype}: read mismatch"

    def rand_pass():
        for k in rng.permutation(reader.n):
            dec(reader.read(int(k)))

    def seq_pass():
        for buf in reader.scan():
            dec(buf)

    row = {"format": fmt, "payload": f"{kind} {dtype}" + (" (int16)" if dtype == "flac" else ""), "mb_per_h": os.path.getsize(path) / 1e6 / (total / 3600),
           "write_s": write_s, "random": timed(rand_pass, reader.n, total, min_time),
           "sequential": timed(seq_pass, reader.n, total, min_time)}
    os.remove(path)
    return row


def rel_errors(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    r, g = np.concatenate([a.ravel() for a in ref]), np.concatenate([a.ravel() for a in got])
    rel = float(np.sqrt(np.mean((g.astype(np.float64) - r) ** 2) / np.mean(r.astype(np.float64) ** 2)))
    return {"max_abs": float(np.abs(g - r).max()), "rel_rms": rel, "snr_db": -20 * np.log10(rel) if rel else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--minutes", type=float, default=20.0, help="audio taken from the start of the manifest")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per read figure")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not args.manifest.exists():
        raise SystemExit(f"manifest {args.manifest} not found (see ../shared/data/README)")

    import torch
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    rng = np.random.default_rng(0)

    files = load_manifest(args.manifest, args.minutes)
    print(f"# Decoded-audio cache formats\n\nCPU: {cpu_name()}; load average {os.getloadavg()[0]:.2f} at start; "
          f"pyarrow {pa.__version__}, numpy {np.__version__}, torch {torch.__version__}; one thread.")
    decode_all(files[:10], FeatureSpec("fbank", 16000, n_mels=N_MELS))  # warm-up: imports, resampler
    waves, wave_s = decode_all(files, FeatureSpec("waveform", 16000))
    feats, fbank_s = decode_all(files, FeatureSpec("fbank", 16000, n_mels=N_MELS))
    durs = [len(w) / 16000 for w in waves]
    total, ids = sum(durs), [Path(f).name for f in files]
    wave_rate, fbank_rate = total / wave_s, total / fbank_s
    print(f"Corpus: {len(files)} utterances, {total / 60:.1f} min of audio (mean {total / len(files):.2f} s).\n"
          f"Plain decode loop (decode_file, one thread): waveform {wave_rate:.0f} audio-s/s, "
          f"fbank {fbank_rate:.0f} audio-s/s.\n")

    combos = [(f, "waveform", d) for f in ("ipc", "ipc-zstd", "parquet-zstd") for d in ("int16", "float32")]
    combos += [("ipc-flac", "waveform", "flac")]
    combos += [(f, "fbank", d) for f in ("ipc", "ipc-zstd", "parquet-zstd") for d in ("float16", "float32")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cache-formats-") as tmp:
        for fmt, kind, dtype in combos:
            rows.append(bench(fmt, kind, dtype, waves if kind == "waveform" else feats, ids, durs, tmp,
                              args.min_time, rng))
    print("| format | payload | MB/h | write s | random audio-s/s (wall) | random audio-s/CPU-s | random us/row "
          "| sequential audio-s/s (wall) | sequential audio-s/CPU-s |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ra, sq = r["random"], r["sequential"]
        print(f"| {r['format']} | {r['payload']} | {r['mb_per_h']:.0f} | {r['write_s']:.2f} | {ra['audio_s_per_s']:.0f} "
              f"| {ra['audio_s_per_cpu_s']:.0f} | {ra['us_per_row']:.0f} | {sq['audio_s_per_s']:.0f} "
              f"| {sq['audio_s_per_cpu_s']:.0f} |")

    q16 = [np.clip(np.rint(w * 32768.0), -32768, 32767).astype(np.int16).astype(np.float32) / 32768.0 for w in waves]
    f16 = [f.astype(np.float16).astype(np.float32) for f in feats]
    errors = {"waveform int16": rel_errors(waves, q16), "fbank float16": rel_errors(feats, f16),
              "fbank float16, normalised": rel_errors([normalize_fbank(f) for f in feats],
                                                      [normalize_fbank(f) for f in f16])}
    print("\n| stored vs float32 | max abs error | relative RMS error | SNR dB |\n|---|---|---|---|")
    for name, e in errors.items():
        print(f"| {name} | {e['max_abs']:.3g} | {e['rel_rms']:.3g} | {e['snr_db']:.1f} |")
    on_grid = float(np.mean(np.concatenate([w * 32768.0 == np.rint(w * 32768.0) for w in waves])))
    errors["waveform int16"]["float32_samples_on_int16_grid"] = on_grid
    print(f"\nDecoded float32 waveform samples already on the int16 grid: {100 * on_grid:.2f} %.\n"
          f"Load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "minutes": total / 60, "utterances": len(files),
                                         "decode_audio_s_per_s": {"waveform": wave_rate, "fbank": fbank_rate},
                                         "formats": rows, "errors": errors}, indent=1))


if __name__ == "__main__":
    main()
