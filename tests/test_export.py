"""`speech-ssl export`: refusals before anything is written, atomic folders with normal permissions, the
transformers round trip (same logits, and a processor that reads the same text as our greedy decoder out
of the same logits, `<unk>` frames included), our own format for filterbank models, and the README's
example against the demo's model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from audio_factory import toy_utterance
from speech_ssl.asr.decoding import GreedyDecoder
from speech_ssl.config import ConfigError
from speech_ssl.data import TextConfig, Vocabulary
from speech_ssl.data.audio import normalize_waveform
from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import build, build_ctc, load, save_model
from speech_ssl.stages import export

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def _ctc_checkpoint(directory: Path, preset: str = "tiny"):
    vocab = Vocabulary.build(["ABC DEF GH"])
    torch.manual_seed(0)
    model = build_ctc(preset, len(vocab)).eval()
    save_model(model, directory, vocab=vocab.index)
    (directory / "text_config.json").write_text(json.dumps(dataclasses.asdict(TextConfig())))
    (directory / "lexicon_words.json").write_text(json.dumps(["ABC", "DEF"]))
    return model, vocab


def _expected_mode(kind: int) -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return kind & ~mask


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny conv CTC checkpoint and its transformers export (made once for the module)."""
    root = tmp_path_factory.mktemp("export")
    model, vocab = _ctc_checkpoint(root / "ctc")
    summary = export.run(export.Config(checkpoint=str(root / "ctc"), output=str(root / "hf")))
    return model, vocab, root / "hf", summary


def test_export_round_trip_through_transformers(exported):
    transformers = pytest.importorskip("transformers")
    model, vocab, out, summary = exported
    assert summary["architecture"] == "Wav2Vec2ForCTC" and summary["vocab_size"] == len(vocab)
    # our normaliser and lexicon travel along, so evaluate/transcribe accept the export
    assert (out / "text_config.json").is_file() and (out / "lexicon_words.json").is_file()

    hf = transformers.Wav2Vec2ForCTC.from_pretrained(str(out)).eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(str(out))
    waves = [toy_utterance("ABC DEF", seed=1), toy_utterance("GH", seed=2)]
    features = processor(waves, sampling_rate=16000, return_tensors="pt", padding=True)
    lengths = torch.tensor([len(w) for w in waves])
    inputs = torch.zeros(2, int(lengths.max()))  # ours: per-utterance normalisation, zero padding, lengths
    for k, w in enumerate(waves):
        inputs[k, : len(w)] = torch.from_numpy(normalize_waveform(w))
    with torch.no_grad():
        ours = model(inputs, lengths)
        theirs = hf(features.input_values, attention_mask=features.attention_mask).logits
    assert theirs.shape == ours.logits.shape
    for k in range(2):
        valid = int(ours.lengths[k])
        torch.testing.assert_close(theirs[k, :valid], ours.logits[k, :valid], atol=1e-4, rtol=0)
        # the same text out of the same logits, exactly (an untrained model emits <s>, </s> and <unk> too)
        ids = ours.logits[k, :valid].argmax(-1)
        assert processor.batch_decode(ids[None]) == GreedyDecoder(vocab)(ours.logits[k:k + 1, :valid])


def _frames(vocab: Vocabulary, tokens: str) -> torch.Tensor:
    """[1, T, V] logits whose argmax spells ``tokens`` frame by frame ('-' blank, 'U' <unk>, 'S' <s>, 'E' </s>)."""
    names = {"-": "<pad>", "U": "<unk>", "S": "<s>", "E": "</s>"}
    logits = torch.randn(len(tokens), len(vocab))
    for t, ch in enumerate(tokens):
        logits[t, vocab.index[names.get(ch, ch)]] = 10.0
    return logits[None]


@pytest.mark.parametrize("tokens", [
    "AA-AB|C",          # repeats collapse, a blank separates a true repeat
    "AUA",              # <unk> between two letters: it separates them, and is written out
    "UUA-U",            # <unk> repeated, at the start and the end
    "A|-|B",            # two word boundaries with a blank between them: two spaces, as transformers
    "||A|B||",          # boundaries at both ends are stripped
    "SAEB-U|",          # <s> and </s> frames
    "----",             # nothing but blanks
])
def test_exported_processor_decodes_exactly_as_our_greedy_decoder(exported, tokens):
    transformers = pytest.importorskip("transformers")
    _, vocab, out, _ = exported
    processor = transformers.Wav2Vec2Processor.from_pretrained(str(out))
    logits = _frames(vocab, tokens)
    ours = GreedyDecoder(vocab)(logits)
    assert processor.batch_decode(logits.argmax(-1)) == ours
    assert processor.tokenizer.decode(logits[0].argmax(-1).tolist()) == ours[0] == vocab.decode_ctc(
        logits[0].argmax(-1).tolist())


def test_exported_processor_agrees_on_random_logits(exported):
    """Many rows of random logits (every token frequent, <unk> included): the same text, row by row."""
    transformers = pytest.importorskip("transformers")
    _, vocab, out, _ = exported
    processor = transformers.Wav2Vec2Processor.from_pretrained(str(out))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 40, len(vocab), generator=generator)
    ids = logits.argmax(-1)
    assert (ids == vocab.index["<unk>"]).any(dim=1).float().mean() > 0.5
    assert processor.batch_decode(ids) == GreedyDecoder(vocab)(logits)


def test_exported_files_have_normal_permissions(exported):
    _, _, out, _ = exported
    assert stat.S_IMODE(out.stat().st_mode) == _expected_mode(0o777)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == _expected_mode(0o666), path.name
    assert _leftovers(out.parent) == []  # no staging folder left beside it


def test_saved_checkpoints_have_normal_permissions(tmp_path):
    save_model(build("tiny"), tmp_path / "pre")
    assert stat.S_IMODE((tmp_path / "pre" / "model.safetensors").stat().st_mode) == _expected_mode(0o666)


def test_export_of_a_pretraining_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build("tiny").eval()
    save_model(model, tmp_path / "pre")
    summary = export.run(export.Config(checkpoint=str(tmp_path / "pre"), output=str(tmp_path / "hf")))
    assert summary["architecture"] == "Wav2Vec2ForPreTraining" and summary["vocab_size"] is None
    wave = torch.from_numpy(normalize_waveform(toy_utterance("ABC", seed=3)))[None]
    encoder = transformers.Wav2Vec2Model.from_pretrained(str(tmp_path / "hf")).eval()
    pretraining = transformers.Wav2Vec2ForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ours = model.encoder(wave).last_hidden_state
        torch.testing.assert_close(encoder(wave).last_hidden_state, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(pretraining.wav2vec2(wave).last_hidden_state, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(pretraining.quantizer.codevectors, model.quantizer.codebook.reshape(
            pretraining.quantizer.codevectors.shape), atol=0, rtol=0)


def test_a_filterbank_model_is_refused_before_anything_is_written(tmp_path):
    _ctc_checkpoint(tmp_path / "fbank", "fbank-tiny")
    out = tmp_path / "exports" / "hf_model"
    with pytest.raises(SpeechSSLError, match="filterbank.*format=speech-ssl"):
        export.run(export.Config(checkpoint=str(tmp_path / "fbank"), output=str(out)))
    assert not out.exists() and not out.parent.exists()  # no empty folder, not even its parent


def test_our_format_exports_a_filterbank_model(tmp_path):
    from speech_ssl.asr.recognizer import Recognizer

    model, vocab = _ctc_checkpoint(tmp_path / "fbank", "fbank-tiny")
    (tmp_path / "fbank" / "optimizer.pt").write_bytes(b"training state, not part of an export")
    summary = export.run(export.Config(checkpoint=str(tmp_path / "fbank"), output=str(tmp_path / "model"),
                                       format="speech-ssl"))
    assert summary["files"] == ["config.json", "lexicon_words.json", "model.safetensors", "text_config.json",
                                "vocab.json"]
    again = load(tmp_path / "model").eval()
    features = torch.randn(1, 120, model.config.n_mels)
    with torch.no_grad():
        torch.testing.assert_close(again(features).logits, model(features).logits, atol=0, rtol=0)
    assert Recognizer.load(tmp_path / "model").vocab == vocab


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    _ctc_checkpoint(tmp_path / "ctc")

    def fail(model, directory, fmt, vocab, source_dir):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write", fail)
    with pytest.raises(OSError, match="disk full"):
        export.run(export.Config(checkpoint=str(tmp_path / "ctc"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_an_existing_output_is_replaced_only_when_asked(tmp_path):
    _ctc_checkpoint(tmp_path / "ctc")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = export.Config(checkpoint=str(tmp_path / "ctc"), output=str(out), format="speech-ssl")
    with pytest.raises(ConfigError, match="overwrite=true"):
        export.run(config)
    assert (out / "notes.txt").read_text() == "mine"
    export.run(dataclasses.replace(config, overwrite=True))
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        export.run(dataclasses.replace(config, output=str(tmp_path / "a_file")))
    with pytest.raises(SpeechSSLError, match="no checkpoint"):
        export.run(dataclasses.replace(config, checkpoint=str(tmp_path / "missing")))


def test_readme_export_example_takes_the_demo_model():
    """The README exports the demo's fine-tuned model in a format that takes its preset (fbank-tiny has no
    transformers equivalent), and its format=hf line names a conv preset."""
    import yaml

    from speech_ssl.models import convert
    from speech_ssl.models.presets import PRESETS

    demo = yaml.safe_load((ROOT / "conf" / "run" / "recipe" / "demo.yaml").read_text())
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^speech-ssl export (.+?)(?:\s+#.*)?$", readme, re.MULTILINE)
    assert commands, "the README shows no speech-ssl export command"
    for command in commands:
        args = dict(arg.split("=", 1) for arg in command.split())
        if args["checkpoint"].startswith("outputs/demo"):
            problem = convert.hf_export_problem(PRESETS[demo["finetune"]["model"]])
            assert args.get("format", "hf") == "speech-ssl" or problem is None, command
    assert any(args.startswith("checkpoint=outputs/demo") for args in commands)


def test_readme_commands_on_a_demo_like_run_folder(tmp_path, capsys):
    """The README's two export lines through the CLI on a fine-tuning run folder holding fbank-tiny (the
    demo's model): format=speech-ssl exports its best checkpoint; format=hf exits 1 with one paragraph
    and writes nothing."""
    from speech_ssl.cli import main

    _ctc_checkpoint(tmp_path / "finetune" / "best", "fbank-tiny")
    assert main(["export", f"checkpoint={tmp_path / 'finetune'}", "format=speech-ssl",
                 f"output={tmp_path / 'demo_model'}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "speech-ssl"
    assert main(["export", f"checkpoint={tmp_path / 'finetune'}", "format=hf", f"output={tmp_path / 'hf_model'}"]) == 1
    err = capsys.readouterr().err
    assert "format=speech-ssl" in err and "Traceback" not in err
    assert not (tmp_path / "hf_model").exists()
