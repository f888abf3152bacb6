"""The results protocol as a pipeline on ``speech_ssl.pipeline``'s runner (the one behind ``speech-ssl run``).

Every arm is a :class:`Stage` named ``<corpus>/<arm>``, which is also its folder under the work folder, so
``run_pipeline`` skips finished arms, resumes interrupted ones (training from its newest checkpoint), re-runs
what reads an arm that changed, keeps a record per arm (``stage.json``, ``stage.log``), takes the lock and
writes ``summary.json`` / ``summary.md``. Per corpus, in order:

    manifests                      the arms' manifests from ../shared/data (results_corpora.write_manifests)
    calibrate                      a short pretraining run: seconds per update (not with --pretrain-updates)
    -- phase: pretraining's length from the calibration --------------------------------------------------
    pretrain                       ``--pretrain-minutes`` of updates, with the speaker probe as a monitor
    init_model                     the random initial weights (``trainer.seed``'s draw)
    probe_init, probe_final        speaker probe on the initial and the pretrained weights
    probe_ctc_init, probe_ctc_final  linear CTC character probe, same two checkpoints
    probe_fsdd                     spoken digits from frozen features (when ../shared/data/fsdd is there)
    finetune/<arm>                 the scratch sweep: each learning-rate multiple at the recipe's length
    scratch_sweep                  their selection CER
    -- phase: the sweep's best learning rate at twice the length -----------------------------------------
    finetune/<arm>                 that trial
    scratch_recipe                 the scratch arms' recipe: the trial with the lowest selection CER
    -- phase: the arms --------------------------------------------------------------------------------
    finetune/<arm>, evaluate/<arm>/<split>   every label budget x {pretrained, scratch} x seeds

A phase is a function of the recorded results of the stages before it (``speech_ssl.pipeline.Phase``): on a
re-run those stages are skipped with their records, so it builds the same stages again. Each training,
probe and evaluation stage is one ``speech-ssl`` command, built as the command line would build it
(``conf/<command>/config.yaml`` + recipe + overrides); ``Protocol.commands`` keeps those lines for RESULTS.md.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from results_corpora import HEADLINE, TARGETS, layout, write_manifests
from speech_ssl.pipeline import Phase, Stage
from speech_ssl.train.metrics import read_metrics

log = logging.getLogger("results")


def stage_config(command: str, overrides: list[str]):
    from speech_ssl.cli.hydra_app import build_config, check_overrides, compose_config

    return build_config(command, compose_config(command, check_overrides(command, overrides)))


def command_line(command: str, overrides: list[str]) -> str:
    return "speech-ssl " + command + " " + " ".join(overrides)


def recipe_lr() -> float:
    """The fine-tuning recipe's learning rate (the scratch sweep's unit)."""
    from speech_ssl.cli.hydra_app import compose_config

    return float(compose_config("finetune", ["recipe=cpu_tiny"]).trainer.optim.lr)


def temperature_override(model: str, updates: int, anneal_fraction: Optional[float]) -> list[str]:
    """The Gumbel temperature schedule compressed to this run's length, as a model override.

    fairseq's decay (0.999995 per update) takes the temperature from 2.0 to its floor 0.5 in about 277k of
    400k updates, ~70 % of the run; over a few thousand updates it would barely leave 2.0, so the quantizer
    would sample near-uniformly noisy codes for the whole run. The same shape here: the floor is reached
    after ``anneal_fraction`` of ``updates``. None keeps the preset's decay."""
    if not anneal_fraction:
        return []
    from speech_ssl.stages.common import resolve_model_config

    cfg = resolve_model_config(model, {})
    steps = max(1, int(updates * anneal_fraction))
    decay = (cfg.temperature_min / cfg.temperature_max) ** (1.0 / steps)
    return [f"model_overrides.temperature_decay={decay:.8f}"]


# ---------------------------------------------------------------------------------------------------
# The stages that are not one speech-ssl command
# ---------------------------------------------------------------------------------------------------

def calibrate(cfg) -> dict[str, Any]:
    """A short pretraining run (``cfg``: speech-ssl pretrain's config); its median seconds per update."""
    from speech_ssl.stages import pretrain

    pretrain.run(cfg)
    records = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    rates = [r["seconds_per_update"] for r in records if r.get("split") == "train" and "seconds_per_update" in r]
    # the first window holds start-up
    return {"seconds_per_update": statistics.median(rates[1:] or rates),
            "calibration_updates": cfg.trainer.max_updates}


def save_initial_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """The pretraining run's initial (random) weights: the loop seeds torch with trainer.seed before building."""
    import torch

    from speech_ssl.models import build, save_model
    from speech_ssl.stages.common import resolve_model_config

    torch.manual_seed(cfg["seed"])
    save_model(build(resolve_model_config(cfg["model"], {})), cfg["output"])
    return {"checkpoint": cfg["output"]}


def best_select_cer(ft_dir: Path) -> float:
    """The lowest CER on the selection split that the run's validations saw (what picks its best checkpoint)."""
    values = [r["valid_cer"] for r in read_metrics(ft_dir / "metrics.jsonl")
              if r.get("split") == "valid" and "valid_cer" in r]
    return min(values) if values else math.inf


def pick_scratch(cfg: dict[str, Any]) -> dict[str, Any]:
    """The scratch sweep's trials (``cfg["trials"]``: lr, updates, dir) with their selection CER; the lowest wins."""
    sweep = [{**t, "select_cer": best_select_cer(Path(t["dir"]))} for t in cfg["trials"]]
    return {"sweep": sweep, "best": min(sweep, key=lambda t: t["select_cer"])}


# ---------------------------------------------------------------------------------------------------
# One corpus
# ---------------------------------------------------------------------------------------------------

class CorpusProtocol:
    """One corpus's stages. ``args``: results.py's command line (work, data, model, smoke, seeds,
    pretrain_minutes, pretrain_updates, finetune_updates, scratch_lr_multiples, fsdd, anneal_fraction)."""

    def __init__(self, args, name: str, base_lr: float, commands: dict[str, str]):
        self.args, self.name, self.base_lr, self.commands = args, name, base_lr, commands
        self.work = args.work / name
        self.corpus = layout(name, self.work / "manifests")
        self.ft_updates = args.finetune_updates[name]
        self.smoke = args.smoke

    # ---- naming ------------------------------------------------------------------------------------
    def stage_name(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def folder(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def stage(self, arm: Sequence[str], fn: Callable[[Any], Any], config: Any, needs: Sequence[str] = (),
              **kwargs) -> Stage:
        """``arm`` (path parts under the corpus) as a stage; ``needs``: arms of this corpus."""
        return Stage(self.stage_name(*arm), fn, config, needs=[self.stage_name(n) for n in needs], **kwargs)

    def command(self, arm: Sequence[str], command: str, overrides: list[str], needs: Sequence[str] = (),
                fn: Optional[Callable[[Any], Any]] = None, **kwargs) -> Stage:
        """``speech-ssl <command> <overrides>`` as a stage (``fn`` instead of the command's own run)."""
        from speech_ssl.stages import COMMANDS

        stage = self.stage(arm, fn or COMMANDS[command].load().run, stage_config(command, overrides), needs, **kwargs)
        self.commands[stage.name] = command_line(command, overrides)
        return stage

    def arm_name(self, budget: str, init: str, seed: int, lr: Optional[float], updates: int) -> str:
        """``<budget>_<init>_s<seed>``, plus the learning rate and length where they are not the recipe's."""
        return (f"{budget}_{init}_s{seed}" + (f"_lr{lr:g}" if lr not in (None, self.base_lr) else "")
                + (f"_u{updates}" if updates != self.ft_updates else ""))

    # ---- the stage list ----------------------------------------------------------------------------
    def stages(self) -> list[Stage | Phase]:
        manifests = self.stage(["manifests"], write_manifests, {"corpus": self.name, "data": str(self.args.data),
                                                                "smoke": self.smoke, "folder": str(self.corpus.folder)},
                               provides=self.corpus.files())
        first = [manifests] if self.args.pretrain_updates else [manifests, self.calibration_run()]
        return [*first, self.pretraining, self.long_trial, self.arms]

    def pretrain_overrides(self) -> list[str]:
        overrides = [f"model={self.args.model}", f"data.train={self.corpus.pretrain}", "recipe=cpu_tiny",
                     f"trainer.seed={self.args.seeds[0]}"]
        if self.smoke:  # in-process training: a Ray Train worker group takes longer to start than a smoke run trains
            overrides += ["data.crop_duration=2.0", "data.batch_seconds=8.0", "trainer.optim.warmup_updates=2",
                          "trainer.num_workers=0"]
        return overrides

    def calibration_run(self) -> Stage:
        steps = 4 if self.smoke else 40
        return self.command(["calibrate"], "pretrain",
                            [*self.pretrain_overrides(), f"output_dir={self.folder('calibrate')}",
                             f"trainer.max_updates={steps}", f"trainer.log_every={2 if self.smoke else 5}",
                             f"trainer.checkpoint_every={steps}", "trainer.validate_every=0"],
                            needs=["manifests"], fn=calibrate)

    def calibration(self, results: dict[str, Any]) -> dict[str, Any]:
        """Pretraining's max_updates: fixed, or the budget over the calibrated seconds per update."""
        if self.args.pretrain_updates:
            return {"max_updates": self.args.pretrain_updates, "seconds_per_update": None,
                    "source": "--pretrain-updates"}
        measured = results[self.stage_name("calibrate")]
        # 20 % of the budget is left for validation, the probes, checkpoints and epoch starts (with 15 % a
        # 60-minute tts-harvard run took 60.6 min: the 40 calibration updates run faster than the average).
        updates = max(10, int(self.args.pretrain_minutes * 60 * 0.80 / measured["seconds_per_update"]))
        if self.smoke:
            updates = min(updates, 12)
        return {"max_updates": updates, **measured, "budget_minutes": self.args.pretrain_minutes,
                "source": "calibrated"}

    def pretraining(self, results: dict[str, Any]) -> list[Stage]:
        """Phase: pretraining to the calibrated length, the probes of its representations, the sweep's trials."""
        updates = self.calibration(results)["max_updates"]
        every = max(1, updates // (3 if self.smoke else 8))
        interval = max(1, updates // (2 if self.smoke else 8))
        c = self.corpus
        pretrain = self.command(
            ["pretrain"], "pretrain",
            [*self.pretrain_overrides(), *temperature_override(self.args.model, updates, self.args.anneal_fraction),
             f"data.valid={c.pretrain_valid}", f"output_dir={self.folder('pretrain')}",
             f"trainer.max_updates={updates}", f"trainer.log_every={max(1, min(25, updates // 10))}", f"trainer.validate_every={interval}",
             f"trainer.checkpoint_every={interval}", "trainer.keep_last=1", f"probe.every_updates={every}",
             f"probe.train={c.probe}", "probe.valid=none", "probe.max_utterances=300"],
            needs=["manifests"], provides=["best", "last"], continues=True)
        init_model = self.stage(["init_model"], save_initial_model,
                                {"model": self.args.model, "seed": self.args.seeds[0],
                                 "output": str(self.folder("init_model", "model"))}, provides=["model"])
        return [pretrain, init_model, *self.probes(), *self.sweep()]

    def probes(self) -> list[Stage]:
        checkpoints = {"init": ("init_model", self.folder("init_model", "model")),
                       "final": ("pretrain", self.folder("pretrain", "last"))}
        c = self.corpus
        # The speaker probe on the initial weights and after pretraining (the run's own monitor is in between).
        speakers = [f"train={c.probe}", "valid=none", "max_utterances=300", "epochs=100"]
        stages = [self.probe(f"probe_{tag}", checkpoints[tag], speakers, ["manifests"]) for tag in ("init", "final")]
        # The CTC character probe: how much of the characters a linear layer reads off frozen features with the
        # smallest label budget, on the random initial model and after pretraining.
        ctc = ["task=ctc", f"train={c.budget(c.budgets[0])}", f"valid={c.eval_set(TARGETS[self.name][0])}",
               "max_utterances=300", *(["data.text.unknown=drop", "epochs=4"] if self.smoke else [])]
        stages += [self.probe(f"probe_ctc_{tag}", checkpoints[tag], ctc, ["manifests"]) for tag in ("init", "final")]
        # Spoken digits from frozen features: this model against random initial weights and filterbanks, the
        # same draws for all three (speech-ssl probe task=classify).
        if self.args.fsdd is not None:
            fsdd = self.args.fsdd
            digits = ["task=classify", f"train={fsdd / 'train.jsonl'}", f"valid={fsdd / 'test.jsonl'}",
                      *(["shots=[1,2]", "draws=2", "max_utterances=200", "epochs=50"] if self.smoke else [])]
            stages.append(self.probe("probe_fsdd", checkpoints["final"], digits, []))
        return stages

    def probe(self, arm: str, checkpoint: tuple[str, Path], overrides: list[str], needs: list[str]) -> Stage:
        source, path = checkpoint
        output = self.folder(arm, "probe.json")
        return self.command([arm], "probe", [f"checkpoint={path}", *overrides, f"output={output}"], needs=[*needs, source])

    # ---- fine-tuning -------------------------------------------------------------------------------
    def finetune(self, budget: str, init: str, seed: int, lr: Optional[float], updates: int) -> Stage:
        name = self.arm_name(budget, init, seed, lr, updates)
        interval = max(1, updates // (2 if self.smoke else 6))
        c = self.corpus
        start = self.folder("pretrain", "best") if init == "pretrained" else "none"
        overrides = [f"model={self.args.model}", f"init={start}",
                     f"data.train={c.budget(budget)}", f"data.valid={c.finetune_valid}", "recipe=cpu_tiny",
                     f"output_dir={self.folder('finetune', name)}", f"trainer.seed={seed}",
                     f"trainer.max_updates={updates}", f"trainer.validate_every={interval}",
                     f"trainer.checkpoint_every={interval}",
                     *([f"trainer.optim.lr={lr:g}"] if lr not in (None, self.base_lr) else []), *c.finetune_overrides]
        if self.smoke:
            # A dozen utterances need not hold every letter of the validation transcripts.
            overrides += ["trainer.log_every=2", "ctc.freeze_updates=2", "data.batch_seconds=12.0",
                          "data.text.unknown=drop", "trainer.num_workers=0"]
        return self.command(["finetune", name], "finetune", overrides,
                            needs=["manifests", *(["pretrain"] if init == "pretrained" else [])],
                            provides=["best", "metrics.jsonl"], continues=True)

    def trial(self, lr: float, updates: int) -> tuple[Stage, dict[str, Any]]:
        """A scratch run at the headline budget, first seed (at the recipe's lr and length: the seed-1 arm)."""
        stage = self.finetune(HEADLINE[self.name], "scratch", self.args.seeds[0], lr, updates)
        arm = stage.name.split("/", 1)[1]
        return stage, {"lr": lr, "updates": updates, "dir": str(self.folder(arm)), "arm": arm}

    def sweep(self) -> list[Stage]:
        """The scratch arm's own learning rate: each multiple of the recipe's, at the recipe's length.

        A model trained from scratch sits on the CTC blank plateau far longer than a pretrained one: with the
        pretrained arm's recipe the comparison is against a model that has not started. The best multiple
        also trains twice as long (next phase); the lowest selection CER wins for every scratch arm."""
        if not self.args.scratch_lr_multiples:
            return []
        trials = [self.trial(self.base_lr * m, self.ft_updates) for m in self.args.scratch_lr_multiples]
        return [*(stage for stage, _ in trials),
                self.stage(["scratch_sweep"], pick_scratch, {"trials": [t for _, t in trials]},
                           needs=[t["arm"] for _, t in trials])]

    def long_trial(self, results: dict[str, Any]) -> list[Stage]:
        """Phase: the sweep's best learning rate at twice the length; then the scratch recipe over every trial."""
        if not self.args.scratch_lr_multiples:
            return []
        sweep = results[self.stage_name("scratch_sweep")]
        stage, trial = self.trial(sweep["best"]["lr"], 2 * self.ft_updates)
        trials = [*({k: t[k] for k in ("lr", "updates", "dir", "arm")} for t in sweep["sweep"]), trial]
        recipe = self.stage(["scratch_recipe"], pick_scratch, {"trials": trials}, needs=[t["arm"] for t in trials])
        return [stage, recipe]

    def scratch(self, results: dict[str, Any]) -> dict[str, Any]:
        """The scratch arms' recipe: lr (None: the recipe's), updates, and the sweep behind it."""
        if not self.args.scratch_lr_multiples:
            return {"lr": None, "updates": self.ft_updates, "sweep": [], "base_lr": self.base_lr}
        recipe = results[self.stage_name("scratch_recipe")]
        best = recipe["best"]
        return {"lr": None if best["lr"] == self.base_lr else best["lr"], "updates": best["updates"],
                "sweep": recipe["sweep"], "base_lr": self.base_lr}

    def plan(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Every fine-tuning arm: each budget, pretrained and from scratch; every seed at the headline budget
        (the figure the targets are about), the first elsewhere."""
        scratch = self.scratch(results)
        arms = []
        for budget in self.corpus.budgets:
            for init in ("pretrained", "scratch"):
                lr, updates = (scratch["lr"], scratch["updates"]) if init == "scratch" else (None, self.ft_updates)
                for seed in (self.args.seeds if budget == HEADLINE[self.name] else self.args.seeds[:1]):
                    arms.append({"budget": budget, "init": init, "seed": seed, "lr": lr, "updates": updates,
                                 "name": self.arm_name(budget, init, seed, lr, updates)})
        return arms

    def arms(self, results: dict[str, Any]) -> list[Stage]:
        """Phase: every fine-tuning arm (those the sweep trained already are not repeated), then its evaluations."""
        scratch = self.scratch(results)
        log.info("%s: scratch recipe lr %g, %d updates", self.name, scratch["lr"] or self.base_lr, scratch["updates"])
        stages = []
        for arm in self.plan(results):
            if self.stage_name("finetune", arm["name"]) not in results:
                stages.append(self.finetune(arm["budget"], arm["init"], arm["seed"], arm["lr"], arm["updates"]))
            for split in self.corpus.eval_splits:
                where = ("evaluate", arm["name"], split)
                overrides = [f"checkpoint={self.folder('finetune', arm['name'], 'best')}",
                             f"data.test={self.corpus.eval_set(split)}", f"output={self.folder(*where, 'scores.json')}"]
                stages.append(self.command(where, "evaluate", overrides, needs=[f"finetune/{arm['name']}"]))
        return stages

    # ---- what the report reads ----------------------------------------------------------------------
    def collect(self, results: dict[str, Any]) -> dict[str, Any]:
        """This corpus's results from the stages' records, in the shape results_report reads."""
        get = lambda *arm: results.get(self.stage_name(*arm))  # noqa: E731
        manifests = get("manifests")
        arms = [{"budget": a["budget"], "minutes": manifests["budget_minutes"][a["budget"]], "init": a["init"],
                 "seed": a["seed"], "dir": str(self.folder("finetune", a["name"])), "lr": a["lr"],
                 "scores": {s: get("evaluate", a["name"], s) for s in self.corpus.eval_splits},
                 "updates": get("finetune", a["name"])["updates"]} for a in self.plan(results)]
        return {"corpus": self.name, "calibration": self.calibration(results), "arms": arms,
                "pretrain_dir": str(self.folder("pretrain")), "pretrain_summary": get("pretrain"),
                "probe_init": get("probe_init"), "probe_final": get("probe_final"),
                "probe_ctc": {"init": get("probe_ctc_init"), "final": get("probe_ctc_final")},
                "ctc_probe_budget": self.corpus.budgets[0], "probe_fsdd": get("probe_fsdd"),
                "notes": manifests["notes"], "budget_minutes": manifests["budget_minutes"],
                "eval_sets": list(self.corpus.eval_splits), "scratch": self.scratch(results)}


class Protocol:
    """Every corpus's stages, one after the other, in one pipeline; ``commands``: stage -> its command line."""

    def __init__(self, args):
        self.commands: dict[str, str] = {}
        base_lr = recipe_lr()
        self.corpora = [CorpusProtocol(args, name, base_lr, self.commands) for name in args.corpora]

    def stages(self) -> list[Stage | Phase]:
        return [stage for corpus in self.corpora for stage in corpus.stages()]

    def collect(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [corpus.collect(results) for corpus in self.corpora]
