"""Linear probes on frozen features: the speaker probe separates synthetic voices and sits at chance on
random labels; the CTC probe runs end to end and reports CER; the command line and its errors; the probe
monitor during pretraining logs probe_accuracy without disturbing the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audio_factory import make_speaker_corpus, make_toy_asr_corpus, toy_words, write_manifest
from speech_ssl.cli import main
from speech_ssl.config import ConfigError, from_dict
from speech_ssl.data import DataConfig, read_source
from speech_ssl.models import build, save_model
from speech_ssl.probe import holdout_split
from speech_ssl.stages import pretrain, probe
from speech_ssl.train.config import OptimConfig, TrainerConfig

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    voices = make_speaker_corpus(root, speakers=4, per_speaker=12, seed=0, split="voices")
    shuffled = make_speaker_corpus(root, speakers=4, per_speaker=12, seed=0, split="shuffled", shuffle_labels=True)
    words = toy_words(12, seed=3)
    toy_train = make_toy_asr_corpus(root, n=32, seed=0, split="toy_train", words=words)
    toy_valid = make_toy_asr_corpus(root, n=10, seed=1, split="toy_valid", words=words)
    torch.manual_seed(0)
    checkpoint = save_model(build("fbank-tiny"), root / "random_fbank_tiny")  # an untrained model
    return {"root": root, "voices": voices, "shuffled": shuffled, "toy_train": toy_train, "toy_valid": toy_valid,
            "checkpoint": str(root / "random_fbank_tiny")}


def _probe(corpora, **kw) -> dict:
    cfg = from_dict(probe.Config, {"checkpoint": corpora["checkpoint"], "valid": "none", "valid_fraction": 0.25,
                                   **kw})
    return probe.run(cfg)


def test_speaker_probe_beats_chance_on_separable_voices(corpora, tmp_path, capsys):
    out = tmp_path / "probe.json"
    result = _probe(corpora, train=str(corpora["voices"]), output=str(out))
    assert result["speakers"] == 4 and result["valid_held_out"]
    assert result["chance_accuracy"] == pytest.approx(0.25)
    assert result["accuracy"] >= 0.9, result
    # The default reads every hidden state of fbank-tiny (input + 4 layers) through learned weights.
    assert result["layer"] == "all" and result["layers"] == [0, 1, 2, 3, 4]
    assert len(result["layer_weights"]) == 5 and sum(result["layer_weights"]) == pytest.approx(1.0)
    assert json.loads(out.read_text())["accuracy"] == result["accuracy"]
    assert out.with_suffix(".png").stat().st_size > 0  # the layer weights, plotted
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("speaker probe (all layers, heaviest ")
    assert json.loads(lines[-1])["accuracy"] == result["accuracy"]


def test_last_layer_probe_stays_an_option(corpora, tmp_path):
    out = tmp_path / "last.json"
    result = _probe(corpora, train=str(corpora["voices"]), layer=-1, output=str(out))
    assert result["layer"] == 4 and result["layers"] == [4]  # -1: the last of fbank-tiny's 4 layers
    assert result["layer_weights"] == [1.0]
    assert not out.with_suffix(".png").exists()  # one fixed layer: nothing to plot


def test_speaker_probe_is_at_chance_when_labels_are_random(corpora):
    """The same audio with speaker labels drawn independently of the voice: the probe can memorise its
    training part, but on held-out utterances it is no better than chance."""
    result = _probe(corpora, train=str(corpora["shuffled"]))
    assert result["train_accuracy"] >= 0.9  # 256 dimensions, 36 utterances: memorised
    assert result["accuracy"] <= result["chance_accuracy"] + 0.2, result


def test_speaker_probe_is_deterministic_and_layer_selectable(corpora):
    a = _probe(corpora, train=str(corpora["voices"]), layer=1, seed=3)
    b = _probe(corpora, train=str(corpora["voices"]), layer=1, seed=3)
    assert a["layer"] == 1
    for key in ("accuracy", "train_accuracy", "train_loss"):
        assert a[key] == b[key]


def test_holdout_split_is_per_speaker_and_deterministic(corpora):
    rows = read_source(str(corpora["voices"]))
    train, valid = holdout_split(rows, 0.25, seed=0, by_speaker=True)
    again = holdout_split(rows, 0.25, seed=0, by_speaker=True)
    assert [u.id for u in valid] == [u.id for u in again[1]]
    assert len(train) + len(valid) == len(rows) and not {u.id for u in train} & {u.id for u in valid}
    per_speaker = {s: sum(u.speaker == s for u in valid) for s in {u.speaker for u in rows}}
    assert set(per_speaker.values()) == {3}


def test_ctc_probe_runs_end_to_end_and_reports_cer(corpora):
    result = _probe(corpora, task="ctc", train=str(corpora["toy_train"]), valid=str(corpora["toy_valid"]),
                    epochs=5)
    assert result["task"] == "ctc" and not result["valid_held_out"]
    assert 0.0 <= result["cer"] <= 3.0 and result["chars"] > 0
    assert result["valid_utterances"] == 10 and result["vocab_size"] == 5 + 8  # specials + the toy letters
    assert result["examples"] and {"ref", "hyp"} <= set(result["examples"][0])


def test_cli_probe_prints_the_result(corpora, tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = main(["probe", f"checkpoint={corpora['checkpoint']}", f"train={corpora['voices']}", "valid=none",
                 "epochs=50", f"output={out}"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["accuracy"] >= 0.9


def _strip(manifest: Path, out: Path, key: str, value=None) -> Path:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row.pop(key, None)
        if value is not None:
            row[key] = value
        row["path"] = str(manifest.parent / row["path"])
    return write_manifest(out, rows)


@pytest.mark.parametrize("case, needle", [
    ("no_speaker", "'train': 48 of 48 rows have no 'speaker' field"),
    ("one_speaker", "'train': all 48 rows have one speaker"),
    ("ctc_no_text", "'train': 48 of 48 rows have no 'text' field"),
    ("bad_task", "Valid choices: speaker, ctc, classify"),
    ("bad_layer", "'layer': layer 9 does not exist"),
    ("word_layer", "'layer': 'first' is not a layer: give 'all' or an integer"),
    ("classify_no_label", "'train': 48 of 48 rows have no 'label' field"),
    ("missing_checkpoint", "'checkpoint': no checkpoint at"),
    ("missing_train", "'train': a required value is missing"),
])
def test_bad_probe_configs_exit_2_naming_the_key(corpora, tmp_path, capsys, case, needle):
    voices = corpora["voices"]
    args = {"checkpoint": corpora["checkpoint"], "train": str(voices), "valid": "none"}
    if case == "no_speaker":
        args["train"] = str(_strip(voices, tmp_path / "nospk.jsonl", "speaker"))
    elif case == "one_speaker":
        args["train"] = str(_strip(voices, tmp_path / "onespk.jsonl", "speaker", "alice"))
    elif case == "ctc_no_text":
        args["task"] = "ctc"
    elif case == "bad_task":
        args["task"] = "speakr"
    elif case == "bad_layer":
        args["layer"] = "9"
    elif case == "word_layer":
        args["layer"] = "first"
    elif case == "classify_no_label":
        args["task"] = "classify"
    elif case == "missing_checkpoint":
        args["checkpoint"] = str(tmp_path / "nothing")
    elif case == "missing_train":
        del args["train"]
    assert main(["probe", *[f"{k}={v}" for k, v in args.items()]]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# During pretraining
# ---------------------------------------------------------------------------------------------------

def _pretrain_cfg(corpora, out: Path, every: int) -> pretrain.Config:
    return from_dict(pretrain.Config, {
        "output_dir": str(out), "model": "fbank-tiny",
        "data": {"train": str(corpora["voices"]), "crop_duration": 1.0, "batch_seconds": 6.0},
        "trainer": {"num_workers": 0, "max_updates": 4, "log_every": 1, "validate_every": 0, "checkpoint_every": 4,
                    "seed": 5, "optim": {"lr": 5e-4, "warmup_updates": 1}},
        "probe": {"every_updates": every, "train": str(corpora["voices"]), "valid_fraction": 0.25, "epochs": 30},
    })


def _pretrain_in_process(cfg: pretrain.Config) -> dict:
    """What pretrain.run does, without starting Ray (in-process decoding)."""
    from speech_ssl.train.launch import run_training
    from speech_ssl.train.tasks.pretrain import PretrainTask

    task = PretrainTask(model_config=pretrain.model_config(cfg), data=cfg.data, train=read_source(cfg.data.train),
                        warmup_updates=cfg.trainer.optim.warmup_updates, monitor=pretrain.build_monitor(cfg))
    return run_training(task, cfg.trainer, Path(cfg.output_dir))


@pytest.mark.slow  # two in-process pretraining runs; the probe itself is tested above, its config errors below
def test_pretraining_logs_probe_accuracy_and_is_not_disturbed_by_it(corpora, tmp_path):
    probed = _pretrain_in_process(_pretrain_cfg(corpora, tmp_path / "probed", every=2))
    plain = _pretrain_in_process(_pretrain_cfg(corpora, tmp_path / "plain", every=0))
    records = [json.loads(line) for line in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["split"] == "probe"]
    assert [r["update"] for r in probes] == [2, 4]
    for r in probes:
        assert 0.0 <= r["probe_accuracy"] <= 1.0 and r["probe_chance_accuracy"] == pytest.approx(0.25)
        assert sum(r[f"probe_layer_weight_{i}"] for i in range(5)) == pytest.approx(1.0)  # all-layer by default
    assert probes[-1]["probe_accuracy"] >= 0.75  # separable voices stay separable
    assert probed["probe"]["probe_accuracy"] == probes[-1]["probe_accuracy"]
    assert not any(r["split"] == "probe" for r in
                   (json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()))
    # The probe leaves the model, its gradient flags and the RNG streams as it found them: same weights.
    a = load_file(str(tmp_path / "probed" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "last" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert plain["updates"] == probed["updates"] == 4


def test_pretrain_probe_config_errors_name_the_key(corpora, tmp_path):
    cfg = _pretrain_cfg(corpora, tmp_path / "x", every=2)
    cfg.probe.train = None
    with pytest.raises(ConfigError) as info:
        pretrain.build_monitor(cfg)
    assert info.value.key == "probe.train"
    cfg.probe.train = str(_strip(corpora["voices"], tmp_path / "nospk.jsonl", "speaker"))
    with pytest.raises(ConfigError) as info:
        pretrain.build_monitor(cfg)
    assert info.value.key == "probe.train" and "'speaker'" in info.value.problem
    cfg.probe.every_updates = 0
    assert pretrain.build_monitor(cfg) is None


# ---------------------------------------------------------------------------------------------------
# The layer mix and few-shot classification
# ---------------------------------------------------------------------------------------------------

def test_layer_mix_learns_to_weigh_the_layer_that_knows():
    """Four layers of [n, 16] features; only layer 2 carries the class (the others are louder noise): the
    learned weights put layer 2 first and the probe classifies the held-out rows."""
    from speech_ssl.probe import fit_classifier

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (240,), generator=g)
    centres = torch.randn(3, 16, generator=g) * 1.5
    x = torch.randn(240, 4, 16, generator=g) * 3.0
    x[:, 2] = centres[labels] + 0.5 * torch.randn(240, 16, generator=g)
    fit = fit_classifier(x[:180], labels[:180], x[180:], labels[180:], 3, epochs=200, batch_size=0, lr=1e-2,
                         weight_decay=0.01, seed=0)
    weights = fit["layer_weights"]
    assert max(range(4), key=weights.__getitem__) == 2 and weights[2] > 0.4, weights
    assert fit["valid_accuracy"] >= 0.9, fit


def test_few_shot_draws_take_k_of_every_class_and_repeat_by_seed():
    from speech_ssl.probe import few_shot_draw

    labels = [str(i % 4) for i in range(40)] + ["rare"]
    picked = few_shot_draw(labels, 3, seed=1)
    counts = {c: sum(labels[i] == c for i in picked) for c in set(labels)}
    assert counts == {"0": 3, "1": 3, "2": 3, "3": 3, "rare": 1}  # a class with fewer gives all it has
    assert few_shot_draw(labels, 3, seed=1) == picked and few_shot_draw(labels, 3, seed=2) != picked


def test_classify_probe_reports_every_arm_on_the_same_draws(corpora, tmp_path, capsys):
    rows = [json.loads(line) for line in Path(corpora["voices"]).read_text().splitlines()]
    speakers = sorted({r["speaker"] for r in rows})
    for row in rows:
        row["label"] = speakers.index(row.pop("speaker"))
        row["path"] = str(Path(corpora["voices"]).parent / row["path"])
    manifest = write_manifest(tmp_path / "labelled.jsonl", rows)
    out = tmp_path / "classify.json"
    args = dict(task="classify", train=str(manifest), shots=[1, 4], draws=2, epochs=60, output=str(out))
    result = _probe(corpora, **args)
    assert result["classes"] == ["0", "1", "2", "3"] and result["shots"] == [1, 4] and result["valid_held_out"]
    assert set(result["arms"]) == {"model", "random_init", "fbank"}
    for arm in result["arms"].values():
        for shots in ("1", "4"):
            spread = arm[shots]
            assert len(spread["accuracies"]) == 2 and all(0.0 <= a <= 1.0 for a in spread["accuracies"])
            assert spread["mean"] == pytest.approx(sum(spread["accuracies"]) / 2)
    # The synthetic voices differ in pitch and timbre: four examples each separate them from filterbanks alone.
    assert result["arms"]["fbank"]["4"]["mean"] >= 0.9, result["arms"]["fbank"]
    assert len(result["layer_weights"]["4"]) == 5
    assert out.with_suffix(".png").stat().st_size > 0
    line = capsys.readouterr().out.strip().splitlines()[-2]
    assert line.startswith("classify probe (label, 4 classes, all layers, 2 draws): valid accuracy k=1 ")
    again = _probe(corpora, **{**args, "output": str(tmp_path / "again.json")})
    assert again["arms"] == result["arms"]  # deterministic given the seed
