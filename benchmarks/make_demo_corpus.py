"""Rebuild the small demo corpus that ships in ``speech_ssl/demo/corpus`` from ``../shared/data``.

The demo corpus is what ``make demo`` and ``speech-ssl run`` use when no data is given. It is a
deterministic subset of tts-harvard (public-domain Harvard sentences, synthetic voices):

* ``unlabeled``: about 30 minutes drawn from the ``unlabeled`` split (Ogg/Opus copied as-is);
* ``train_10min``: the whole ``train_10min`` split (Ogg/Opus copied as-is);
* ``dev``: 50 utterances of ``dev`` (copied as-is), used for validation during fine-tuning;
* ``test``: 100 utterances of ``test``, re-encoded from FLAC to Ogg/Opus to stay under 15 MB.

Usage: python benchmarks/make_demo_corpus.py [--source ../shared/data/tts-harvard]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "speech_ssl" / "demo" / "corpus"


def _read(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _copy_split(src_root: Path, rows: list[dict], name: str, reencode: bool = False) -> None:
    out_rows = []
    for row in rows:
        src = src_root / row["path"]
        rel = Path(name) / Path(row["path"]).relative_to(Path(row["path"]).parts[0])
        if reencode:
            rel = rel.with_name(rel.name.split(".")[0] + ".opus.ogg")
        dst = DEST / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if reencode:
            audio, rate = sf.read(src, dtype="float32")
            sf.write(dst, audio, rate, format="OGG", subtype="OPUS")
        else:
            shutil.copyfile(src, dst)
        out_rows.append({**row, "path": rel.as_posix(), "duration": round(sf.info(dst).duration, 3)})
    with open(DEST / f"{name}.jsonl", "w") as f:
        for row in out_rows:
            f.write(json.dumps(row) + "\n")
    minutes = sum(r["duration"] for r in out_rows) / 60
    print(f"{name}: {len(out_rows)} utterances, {minutes:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "tts-harvard")
    args = parser.parse_args()
    rng = random.Random(0)
    for split in ("unlabeled", "train_10min", "dev", "test"):
        shutil.rmtree(DEST / split, ignore_errors=True)
    DEST.mkdir(parents=True, exist_ok=True)

    unlabeled = _read(args.source / "unlabeled.jsonl")
    rng.shuffle(unlabeled)
    picked, total = [], 0.0
    for row in unlabeled:
        if total >= 30 * 60:
            break
        picked.append(row)
        total += row["duration"]
    picked.sort(key=lambda r: r["path"])
    # The unlabeled split must not carry transcripts into pretraining by accident.
    _copy_split(args.source, [{k: v for k, v in r.items() if k != "text"} for r in picked], "unlabeled")
    _copy_split(args.source, _read(args.source / "train_10min.jsonl"), "train_10min")
    dev = _read(args.source / "dev.jsonl")
    _copy_split(args.source, sorted(rng.sample(dev, 50), key=lambda r: r["path"]), "dev")
    test = _read(args.source / "test.jsonl")
    _copy_split(args.source, sorted(rng.sample(test, 100), key=lambda r: r["path"]), "test", reencode=True)


if __name__ == "__main__":
    main()
