"""CTC fine-tuning end to end on generated audio: a tiny model learns the toy task; evaluate's numbers
agree with jiwer; lexicon beam search (with and without KenLM) never does worse than greedy; transcribe
gives the same hypotheses; the freeze schedule is honoured; a resumed run equals a straight one; bad
transcripts are skipped and counted, or stop the run with one clear message."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from audio_factory import (make_toy_asr_corpus, toy_utterance, toy_words, write_arpa, write_audio,
                           write_manifest)
from speech_ssl.cli import main
from speech_ssl.data import TextConfig, TextNormalizer, read_source
from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import build, save_model
from speech_ssl.stages import finetune, transcribe
from speech_ssl.train.config import OptimConfig, TrainerConfig
from speech_ssl.train.tasks.ctc import CTCConfig

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A closed-vocabulary toy task: train and test draw their words from the same 12 toy words."""
    root = tmp_path_factory.mktemp("toy")
    words = toy_words(12, seed=3)
    train = make_toy_asr_corpus(root, n=80, seed=0, split="train", words=words)
    test = make_toy_asr_corpus(root, n=16, seed=1, split="test", words=words)
    return {"root": root, "train": train, "test": test, "words": words}


@pytest.fixture(scope="module")
def trained(ray_local, toy, tmp_path_factory):
    """The `fbank-tiny` preset fine-tuned from scratch on the toy task through the command line. (The
    waveform `tiny` preset from scratch, with its random conv front end frozen as the recipe says, stays on
    the all-blank plateau for hundreds of updates on this task; filterbanks learn it in about a hundred.)"""
    out = tmp_path_factory.mktemp("finetuned") / "run"
    code = main(["finetune", f"output_dir={out}", "init=none", "model=fbank-tiny", f"data.train={toy['train']}",
                 f"data.valid={toy['test']}", "data.batch_seconds=6", "trainer.num_workers=0",
                 "trainer.max_updates=120", "trainer.log_every=20", "trainer.validate_every=60",
                 "trainer.checkpoint_every=60", "trainer.optim.lr=1.5e-3", "ctc.freeze_updates=0",
                 "model_overrides.mask_prob=0", "model_overrides.mask_channel_prob=0", "ctc.select_by=valid_cer"])
    assert code == 0
    return out


def _last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _evaluate(capsys, checkpoint, test, out: Path, *extra: str) -> dict:
    assert main(["evaluate", f"checkpoint={checkpoint}", f"data.test={test}", f"output={out}", *extra]) == 0
    printed = _last_json_line(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    return printed


@pytest.fixture(scope="module")
def greedy(trained, toy, tmp_path_factory):
    """``speech-ssl evaluate`` (greedy) of the trained model on the test manifest plus a row whose file is
    gone; returns (what it printed last, what it wrote)."""
    import contextlib
    import io

    rows = [json.loads(line) for line in Path(toy["test"]).read_text().splitlines()]
    rows.append({"path": "test/gone.flac", "duration": 1.0, "text": toy["words"][0]})
    manifest = write_manifest(toy["root"] / "test_with_missing.jsonl", rows)
    out = tmp_path_factory.mktemp("greedy") / "greedy.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["evaluate", f"checkpoint={trained}", f"data.test={manifest}", f"output={out}"]) == 0
    return _last_json_line(stdout.getvalue()), json.loads(out.read_text()), rows


def test_finetuned_tiny_model_learns_the_toy_task_and_evaluate_agrees_with_jiwer(trained, toy, greedy):
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["updates"] == 120
    assert (trained / "best" / "model.safetensors").is_file() and (trained / "last" / "vocab.json").is_file()
    assert set(json.loads((trained / "best" / "lexicon_words.json").read_text())) == set(toy["words"])
    # ctc.select_by=valid_cer: the best checkpoint is the validation with the lowest CER, and its score is a CER.
    valid = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    valid = [m for m in valid if m["split"] == "valid"]
    assert [m["update"] for m in valid] == [60, 120]
    best = min(valid, key=lambda m: m["valid_cer"])
    assert Path(os.path.realpath(trained / "best")).name == f"checkpoint_{best['update']:08d}"
    state = json.loads((trained / "last" / "trainer_state.json").read_text())
    assert state["best_score"] == best["valid_cer"] != best["valid_wer"]

    # The missing file is quarantined and counted, not fatal.
    result, written, rows = greedy
    assert result == written and result["decoder"] == "greedy"
    assert result["utterances"] == 16 and result["quarantined"] == 1 and result["read"] == 17
    assert result["quarantine_reasons"] == {"missing": 1}
    assert result["audio_hours"] == pytest.approx(sum(r["duration"] for r in rows[:-1]) / 3600, rel=0.01)
    assert 0 < result["rtf"] < 5 and result["elapsed_seconds"] > 0
    # Chance: a blank-only output scores CER 1, random letters in the right word shapes about 0.75. These
    # settings reach 0.09-0.25 over seeds (the greedy CER of 80 updates was 0.25-0.40: too close).
    assert result["cer"] < 0.4, result

    hyps = [json.loads(line) for line in Path(result["hypotheses"]).read_text().splitlines()]
    assert [h["id"] for h in hyps] == [Path(r["path"]).with_suffix("").as_posix() for r in rows[:-1]]
    refs, outs = [h["ref"] for h in hyps], [h["hyp"] for h in hyps]
    assert refs == [r["text"] for r in rows[:-1]]
    assert result["wer"] == pytest.approx(jiwer.wer(refs, outs), abs=1e-12)
    assert result["cer"] == pytest.approx(jiwer.cer(refs, outs), abs=1e-12)
    for h in hyps:
        assert h["word_errors"] == round(jiwer.wer(h["ref"], h["hyp"]) * len(h["ref"].split()))


def test_beam_search_with_the_training_lexicon_never_does_worse_than_greedy(trained, toy, greedy, tmp_path, capsys):
    greedy = greedy[0]
    beam = _evaluate(capsys, trained, toy["test"], tmp_path / "beam.json", "decoder=beam", "beam.beam_size=16")
    assert beam["decoder"] == "beam" and beam["beam"]["lexicon"] == "training transcripts"
    assert beam["wer"] <= greedy["wer"] and beam["cer"] <= greedy["cer"], (greedy, beam)
    # every hypothesis is made of lexicon words
    for line in Path(beam["hypotheses"]).read_text().splitlines():
        assert set(json.loads(line)["hyp"].split()) <= set(toy["words"])
    # with a KenLM model over the same words
    arpa = write_arpa(tmp_path / "toy.arpa", {w: math.log10(1 / len(toy["words"])) for w in toy["words"]})
    with_lm = _evaluate(capsys, trained, toy["test"], tmp_path / "lm.json", "decoder=beam", "beam.beam_size=16",
                        f"beam.kenlm={arpa}", "beam.lm_weight=0.5")
    assert with_lm["beam"]["kenlm"] == str(arpa)
    assert with_lm["wer"] <= greedy["wer"], (greedy, with_lm)


def test_transcribe_through_ray_data_with_long_and_broken_files(trained, toy, greedy, tmp_path):
    expected = {json.loads(line)["id"].split("/")[-1]: json.loads(line)["hyp"]
                for line in Path(greedy[0]["hypotheses"]).read_text().splitlines()}
    # a long recording (cut into segments whose transcripts are joined again) and a file that is not audio
    segment = 3.0
    durations = [json.loads(line)["duration"] for line in Path(toy["test"]).read_text().splitlines()]
    assert max(durations) < segment  # the test utterances stay whole
    extra = tmp_path / "extra"
    long_wave = np.concatenate([toy_utterance(w, seed=k) for k, w in enumerate(toy["words"][:8])])
    write_audio(extra / "long.flac", long_wave)
    (extra / "broken.flac").write_text("not audio")
    out = tmp_path / "transcripts.jsonl"
    # ray_threshold=0: decoded by Ray Data tasks (evaluate above decoded in-process): the same transcripts
    summary = transcribe.run(transcribe.Config(
        checkpoint=str(trained), input=[str(toy["root"] / "test"), str(extra)], output=str(out), ray_threshold=0,
        data=transcribe.DataConfig(segment_duration=segment)))
    lines = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert summary["files"] == 17 and summary["quarantined"] == 1
    assert {k: v["text"] for k, v in lines.items() if k != "long"} == expected
    long_seconds = len(long_wave) / 16000
    assert lines["long"]["duration"] == pytest.approx(long_seconds, abs=0.05)
    # 8 words of 2-4 letters; the joined transcript of its segments holds most of them
    assert len(lines["long"]["text"].replace(" ", "")) >= 8
    assert summary["read"] == 16 + math.ceil(long_seconds / segment) + 1 and summary["used"] == summary["read"] - 1


# ---------------------------------------------------------------------------------------------------
# freeze schedule, resume, bad transcripts


@pytest.fixture(scope="module")
def small(toy, tmp_path_factory):
    """A few toy utterances for the waveform `tiny` preset, plus an empty transcript and an utterance
    far too short for its transcript; and a `tiny` pretraining checkpoint to start from."""
    root = tmp_path_factory.mktemp("small")
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()][:8]
    for r in rows:
        r["path"] = str(Path(toy["train"]).parent / r["path"])
    write_audio(root / "short.flac", toy_utterance("AB", seed=9)[:4000])  # 0.25 s: 11 frames
    rows.append({"id": "empty", "path": rows[0]["path"], "duration": rows[0]["duration"], "text": ""})
    rows.append({"id": "short", "path": str(root / "short.flac"), "duration": 0.25, "text": "ABCD EFGH ABCD"})
    train = write_manifest(root / "train.jsonl", rows)
    valid = write_manifest(root / "valid.jsonl", rows[:2])
    torch.manual_seed(0)
    save_model(build("tiny"), root / "pretrained")
    return {"train": train, "valid": valid, "init": root / "pretrained"}


def _small_config(small, out: Path, max_updates: int) -> finetune.Config:
    return finetune.Config(
        output_dir=str(out), init=str(small["init"]),
        data=finetune.FinetuneDataConfig(train=str(small["train"]), valid=str(small["valid"]), batch_seconds=3.0),
        ctc=CTCConfig(freeze_updates=2),  # masking, LayerDrop and dropout on: the RNG must survive a resume
        trainer=TrainerConfig(num_workers=0, max_updates=max_updates, log_every=1, validate_every=0,
                              checkpoint_every=1, keep_last=10, seed=3,
                              optim=OptimConfig(lr=1e-3, eps=1e-8, weight_decay=0.0, schedule="constant")))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_freeze_schedule_resume_and_skipped_transcripts(ray_local, small, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="speech_ssl")
    straight = finetune.run(_small_config(small, tmp_path / "straight", 4))
    assert straight["updates"] == 4 and straight["nonfinite_skipped"] == 0

    init = {k: v for k, v in _weights(small["init"]).items() if k.startswith("encoder.")}
    ckpt = {n: _weights(tmp_path / "straight" / f"checkpoint_{n:08d}") for n in range(1, 5)}
    # updates 1-2: the encoder is frozen bit for bit, the head trains
    assert _same(ckpt[1], init, "encoder.") and _same(ckpt[2], init, "encoder.")
    assert not _same(ckpt[1], ckpt[2], "ctc_head.")
    # updates 3-4: the Transformer trains, the conv front end stays frozen
    assert not _same(ckpt[3], ckpt[2], "encoder.context.") and not _same(ckpt[4], ckpt[3], "encoder.context.")
    assert _same(ckpt[4], init, "encoder.feature_encoder.")

    # A run stopped after 2 updates and resumed to 4 equals the straight one (across the unfreezing).
    first = finetune.run(_small_config(small, tmp_path / "resumed", 2))
    assert first["updates"] == 2
    second = finetune.run(_small_config(small, tmp_path / "resumed", 4))
    assert second["updates"] == 4 and second["resumes"] == 1
    resumed = _weights(tmp_path / "resumed" / "last")
    for key, value in ckpt[4].items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)

    # The empty transcript and the too-short utterance: skipped, counted, listed; no NaN anywhere.
    entries = [json.loads(line) for line in (tmp_path / "straight" / "quarantine_train.jsonl").read_text().splitlines()]
    assert sorted((e["id"], e["reason"], e["kind"]) for e in entries) == [
        ("empty", "empty-transcript", "filtered"), ("short", "too-short-for-transcript", "filtered")]
    counts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train data: read")]
    assert counts and "filtered 2 (filtered: empty-transcript 1, too-short-for-transcript 1" in counts[0]
    assert any("2 of 10 utterances skipped" in r.getMessage() for r in caplog.records)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if m["split"] == "train")
    assert all(math.isfinite(m["valid_loss"]) for m in metrics if m["split"] == "valid")


def test_init_from_a_transformers_directory(small, tmp_path):
    """``init`` may be a transformers model directory: the CTC model starts from its encoder weights."""
    from speech_ssl.data import DataConfig, Vocabulary
    from speech_ssl.models import export_hf, load
    from speech_ssl.train.tasks.ctc import CTCTask, FinetuneModelOverrides, finetune_model_config, init_model_config

    source = load(small["init"])
    export_hf(source, tmp_path / "hf")
    vocab = Vocabulary.build(["AB CD"])
    base, finetuned = init_model_config(str(tmp_path / "hf"))  # a pretraining model: the fine-tuning layer applies
    config = finetune_model_config(base, FinetuneModelOverrides(mask_prob=0.3), base_is_finetuned=finetuned)
    task = CTCTask(init=str(tmp_path / "hf"), model_config=config, data=DataConfig(), train=[], valid=None, vocab=vocab)
    model = task.build_model()
    assert model.vocab_size == len(vocab) and model.config.mask_prob == 0.3 and model.config.dropout == 0.0
    theirs = source.encoder.state_dict()
    for key, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=0, msg=key)
    assert not any(p.requires_grad for p in model.encoder.feature_encoder.parameters())


# ---------------------------------------------------------------------------------------------------
# bad transcripts that stop a run (before Ray or any worker starts)


def test_characters_outside_the_vocabulary_are_one_clear_error(toy, tmp_path, capsys):
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()][:4]
    for r in rows:
        r["path"] = str(Path(toy["train"]).parent / r["path"])
    bad_train = [dict(rows[0], text="AB1 C#"), dict(rows[1], text="BA 2"), *rows[2:]]
    train = write_manifest(tmp_path / "bad_train.jsonl", bad_train)
    valid = write_manifest(tmp_path / "valid.jsonl", rows[:2])
    code = main(["finetune", f"output_dir={tmp_path / 'a'}", "init=none", f"data.train={train}",
                 f"data.valid={valid}", "trainer.num_workers=0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "data.train" in err and "'1'" in err and "'#'" in err and "'2'" in err and "data.text.char_map" in err

    # a letter the training transcripts never show, in the validation set
    bad_valid = write_manifest(tmp_path / "bad_valid.jsonl", [dict(rows[0], text="ABZ"), rows[1]])
    with pytest.raises(SpeechSSLError, match=r"data\.valid: .*'Z'"):
        finetune.run(finetune.Config(output_dir=str(tmp_path / "b"), init="none",
                                     data=finetune.FinetuneDataConfig(train=str(valid), valid=str(bad_valid))))

    # or the configured mapping: char_map / remove normalise them away
    mapped = TextNormalizer(TextConfig(char_map={"1": "A", "2": "B"}, remove="#"))
    utterances = read_source(str(train))
    finetune.check_texts(mapped, utterances, "data.train")
    assert mapped(bad_train[0]["text"]) == "ABA C"
    dropped = TextNormalizer(TextConfig(unknown="drop"))
    finetune.check_texts(dropped, utterances, "data.train")
    assert dropped("BA 2") == "BA"
