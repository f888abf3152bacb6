"""Issue 9's results table: does self-supervised pretraining pay off with few labels? One command.

For each corpus under ../shared/data (see its README):

* pretrain a CPU-sized model (``--model``, fbank-tiny by default; `conf/pretrain/recipe/cpu_tiny`) on the
  unlabeled audio for a wall-clock budget (``--pretrain-minutes``). The trainer counts updates, not
  minutes, so a short calibration run measures seconds per update first and the budget becomes
  ``trainer.max_updates`` (the calibration's record keeps the rate, so a resumed run trains to the same
  length). A speaker probe monitors the representations during pretraining (``probe.every_updates``), and
  once more on the initial (random) weights;
  - tts-harvard: pretrain on ``unlabeled``; labeled budgets ``train_10min`` and ``train_1h``; evaluate on
    ``dev`` and ``test``;
  - speechocean762: pretrain on the audio of ``train`` and ``unlabeled`` (transcripts dropped); labeled
    budgets: a deterministic 30-minute subset of ``train`` (written beside the runs) and all of ``train``;
    ``dev`` split by speaker into a selection half (picks checkpoints) and a report half (the tables);
* fine-tune the pretrained model on each budget, and train the same architecture from scratch
  (``finetune init=none``) with the same budget and recipe (`conf/finetune/recipe/cpu_tiny`), except the
  learning rate and length, which a sweep on the selection split picks for the scratch arms;
* evaluate CER and WER (greedy decoding) of every fine-tuned model; the headline budget of each corpus
  (tts-harvard 10 min, speechocean762 30 min) with every seed of ``--seeds`` (default 1 2 3), the others
  with the first;
* probe the frozen pretrained model on a task unlike its data: spoken digits (``../shared/data/fsdd``),
  k = 1, 5, 20 examples per digit, against random initial weights and filterbanks on the same draws;
* write ``<out>/RESULTS.md`` (tables, commands to reproduce, hardware, wall times) and PNG plots under
  ``<out>/results/`` (pretraining curves, probe accuracy against updates, CER against labeled minutes).

The protocol is a pipeline on the runner behind ``speech-ssl run`` (``speech_ssl.pipeline.run_pipeline``):
every arm is a stage in ``<work>/<corpus>/<arm>/`` with its record (``stage.json``) and log (``stage.log``),
and ``<work>/summary.md`` lists them all. Finished arms are skipped, interrupted ones resume (training from
its newest checkpoint), an arm whose inputs changed (a longer pretraining) runs again with everything that
reads it, and one run at a time holds the work folder. The stages and their phases are in
``benchmarks/results_pipeline.py`` (manifests: ``results_corpora.py``), the report in ``results_report.py``.
Every training, probe and evaluation arm is one ``speech-ssl`` command with the configuration the command
line would build (``conf/<command>/config.yaml`` + recipe + overrides), listed in RESULTS.md.

    .venv/bin/python benchmarks/results.py                          # both corpora, 60 min pretraining each
    .venv/bin/python benchmarks/results.py --corpora tts-harvard --pretrain-minutes 30 --seeds 1 2 3
    .venv/bin/python benchmarks/results.py --smoke                  # minutes: tiny budgets, a few utterances
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
DATA = ROOT.parent / "shared" / "data"
FSDD = "fsdd"  # the downstream task unlike the pretraining data: spoken digits, 8 kHz

from results_corpora import CORPORA  # noqa: E402

log = logging.getLogger("results")


def finetune_updates(values: list[str], default: int, parser: argparse.ArgumentParser) -> dict[str, int]:
    """``["800", "speechocean762=2000"]`` -> updates per corpus (a bare number sets every corpus)."""
    updates = dict.fromkeys(CORPORA, default)
    for value in values:
        corpus, _, number = value.rpartition("=")
        if corpus and corpus not in CORPORA:
            parser.error(f"--finetune-updates {value}: unknown corpus {corpus!r}; choose from {', '.join(CORPORA)}")
        if not number.isdigit() or int(number) < 1:
            parser.error(f"--finetune-updates {value}: expected N or CORPUS=N with N a positive integer")
        for name in ([corpus] if corpus else CORPORA):
            updates[name] = int(number)
    return updates


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--pretrain-minutes", type=float, default=None,
                        help="wall-clock pretraining budget per corpus (default 60; smoke 0.2)")
    parser.add_argument("--pretrain-updates", type=int, default=None,
                        help="pretraining updates instead of a calibrated time budget")
    parser.add_argument("--finetune-updates", nargs="+", default=None, metavar="[CORPUS=]N",
                        help="fine-tuning updates of every arm, for all corpora (N) or one (CORPUS=N); "
                             "default 1500 (smoke 4)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                        help="fine-tuning seeds of the headline budget (other budgets run the first)")
    parser.add_argument("--scratch-lr-multiples", nargs="*", type=float, default=None,
                        help="the scratch arm's learning-rate sweep, as multiples of the recipe's (default 0.5 1 2 4; "
                             "smoke 1 2; none: the scratch arms use the recipe)")
    parser.add_argument("--fsdd", type=Path, default=DATA / FSDD,
                        help="the spoken-digit corpus of the downstream probe (skipped when absent)")
    parser.add_argument("--model", default="fbank-tiny")
    parser.add_argument("--anneal-fraction", type=float, default=0.7,
                        help="the Gumbel temperature reaches its floor after this fraction of the pretraining "
                             "updates, as fairseq's schedule does over 400k (0: the preset's per-update decay)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where RESULTS.md and results/*.png go (default docs/; smoke outputs/results-smoke/)")
    parser.add_argument("--work", type=Path, default=None,
                        help="runs and manifests (default outputs/results/; smoke <out>/work)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared corpora (../shared/data)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budgets on a handful of utterances, training in-process (a few minutes)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.pretrain_minutes is None:
        args.pretrain_minutes = 0.2 if args.smoke else 60.0
    if args.scratch_lr_multiples is None:
        args.scratch_lr_multiples = [1.0, 2.0] if args.smoke else [0.5, 1.0, 2.0, 4.0]
    args.finetune_updates = finetune_updates(args.finetune_updates or [], default=4 if args.smoke else 1500,
                                             parser=parser)
    if args.out is None:
        args.out = ROOT / ("outputs/results-smoke" if args.smoke else "docs")
    if args.work is None:
        args.work = args.out / "work" if args.smoke else ROOT / "outputs" / "results"
    args.out, args.work = args.out.resolve(), args.work.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("speech_ssl").setLevel(logging.INFO)
    missing = [c for c in args.corpora if not (args.data / c).is_dir()]
    if missing:
        print(f"results.py: no corpus {', '.join(missing)} under {args.data} (see ../shared/data/README.md)",
              file=sys.stderr)
        return 2
    if args.fsdd is not None and not (args.fsdd / "train.jsonl").exists():
        log.warning("no fsdd corpus at %s: the downstream digit probe is skipped", args.fsdd)
        args.fsdd = None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return run(args)


def run(args) -> int:
    """The protocol's pipeline in ``args.work``, then RESULTS.md and its plots in ``args.out``."""
    from results_pipeline import Protocol
    from results_report import headline, write_report
    from speech_ssl.pipeline import run_pipeline
    from speech_ssl.runtime import RayConfig, ray_session

    started = time.monotonic()
    protocol = Protocol(args)

    def summarize(_out: Path, results: dict) -> dict:  # the collected results go to <work>/summary.json
        collected = protocol.collect(results)
        return {"results": collected, "highlights": [h for h in map(headline, collected) if h],
                "outputs": {"RESULTS.md": str(args.out / "RESULTS.md"), "plots": str(args.out / "results")}}

    # One local Ray for every stage (each would start its own otherwise); no dashboard: on 2 cores its
    # process takes CPU from the training worker for nothing a batch experiment reads.
    with ray_session(RayConfig(include_dashboard=False)):
        summary = run_pipeline("results", protocol.stages(), args.work, summarize=summarize)
    rows = summary["stages"]  # in the order they ran
    commands = {row["stage"]: protocol.commands[row["stage"]] for row in rows if row["stage"] in protocol.commands}
    path = write_report(summary["results"], args, args.out, time.monotonic() - started,
                        {row["stage"]: row["wall_seconds"] for row in rows}, commands)
    counts = ", ".join(f"{n} {status}" for status in ("ran", "resumed", "skipped")
                       if (n := sum(row["status"] == status for row in rows)))
    print(f"{len(rows)} stages ({counts}); their records: {args.work}/summary.md")
    print(f"wrote {path} and {args.out / 'results'}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
