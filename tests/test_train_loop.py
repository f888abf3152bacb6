"""The shared training loop's mechanics, on a small regression task (no audio, no Ray): loss
normalisation with gradient accumulation, non-finite skips, exact resume, checkpoint integrity,
learning-rate schedules and the state (de)serialisation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speech_ssl.errors import SpeechSSLError
from speech_ssl.train import checkpoint as ckpt
from speech_ssl.train.config import OptimConfig, TrainerConfig
from speech_ssl.train.context import LocalContext
from speech_ssl.train.loop import train
from speech_ssl.train.optim import lr_multiplier
from speech_ssl.train.task import StepOutput


@dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor
    position: int


class _Stream:
    """Deterministic batches of a fixed linear problem; ``nan_at`` positions carry a NaN input."""

    def __init__(self, batch_size: int, num_batches: int, rank: int, seed: int, nan_at=()):
        self.batch_size, self.num_batches, self.rank, self.seed, self.nan_at = batch_size, num_batches, rank, seed, set(nan_at)

    def iter_epoch(self, epoch: int, start: int = 0):
        for position in range(start, self.num_batches):
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch * 1009 + position * 7 + self.rank)
            x = torch.randn(self.batch_size, 4, generator=g)
            y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(self.batch_size, generator=g)
            if position in self.nan_at and epoch == 0:
                x[0, 0] = float("nan")
            yield _Batch(x, y, position)


class RegressionTask:
    name = "regression"
    best_metric = "valid_loss"
    best_mode = "min"
    progress_keys = ("loss",)
    mean_keys = ()
    plot_panels = (("loss", ("loss", "valid_loss")),)

    def __init__(self, batch_size=8, num_batches=6, nan_at=(), dropout=0.0):
        self.batch_size, self.num_batches, self.nan_at, self.dropout = batch_size, num_batches, nan_at, dropout

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Dropout(self.dropout), torch.nn.Linear(4, 1))

    def train_batches(self, rank, world_size, seed):
        return _Stream(self.batch_size, self.num_batches, rank, seed, self.nan_at)

    def valid_batches(self, rank, world_size, seed):
        return _Stream(16, 1, rank, seed + 1)

    def step(self, model, batch, device):
        pred = model(batch.x).squeeze(-1)
        loss = ((pred - batch.y) ** 2).sum()
        return StepOutput(loss, len(batch.y), {"examples": float(len(batch.y))}, audio_seconds=1.0)

    def valid_keys(self):
        return ("loss_sum", "n")

    def valid_step(self, model, batch, device):
        pred = model(batch.x).squeeze(-1)
        return {"loss_sum": float(((pred - batch.y) ** 2).sum()), "n": float(len(batch.y))}

    def summarize(self, sums, sample_size):
        return dict(sums)

    def summarize_valid(self, sums):
        return {"valid_loss": sums["loss_sum"] / sums["n"]}

    def on_update(self, model, updates):
        pass

    def extra_files(self):
        return {}

    def find_unused_parameters(self, model):
        return False

    def collapse_monitor(self):
        return None

    def ingest_reports(self):
        return {}


def _cfg(**kw) -> TrainerConfig:
    optim = OptimConfig(lr=0.05, schedule="constant", weight_decay=0.0, betas=[0.9, 0.98], eps=1e-8)
    # fp32: these tests compare the loop's mechanics exactly (precision=auto is bf16 on CPUs with native bf16)
    base = dict(num_workers=0, max_updates=12, log_every=3, validate_every=0, checkpoint_every=4, keep_last=2,
                optim=optim, seed=3, precision="fp32")
    base.update(kw)
    return TrainerConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _run(task, cfg, out: Path):
    return train(task, cfg, LocalContext(str(out)), out)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """update_freq=2 over batches of 8 == one batch of 16: the loss is normalised by the total count."""
    class Pairs(RegressionTask):
        def train_batches(self, rank, world_size, seed):
            big = _Stream(16, self.num_batches, rank, seed)

            class Halves:
                def iter_epoch(self, epoch, start=0):
                    for b in big.iter_epoch(epoch, start // 2):
                        for h in range(2):
                            yield _Batch(b.x[h * 8:(h + 1) * 8], b.y[h * 8:(h + 1) * 8], b.position * 2 + h)
            return Halves()

    _run(RegressionTask(batch_size=16), _cfg(max_updates=6, checkpoint_every=6), tmp_path / "big")
    _run(Pairs(batch_size=8), _cfg(max_updates=6, checkpoint_every=6, update_freq=2), tmp_path / "acc")
    a, b = _weights(tmp_path / "big" / "last"), _weights(tmp_path / "acc" / "last")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_gradient_is_normalised_by_the_total_sample_size(tmp_path):
    """One update of 2 accumulated micro-batches moves the weights by AdamW's step for the gradient of
    the *mean* loss over all 16 examples (with a large eps the step is proportional to the gradient)."""
    task = RegressionTask(batch_size=8)
    eps, lr = 1e3, 0.05
    cfg = _cfg(max_updates=1, checkpoint_every=1, update_freq=2,
               optim=OptimConfig(lr=lr, schedule="constant", weight_decay=0.0, betas=[0.9, 0.98], eps=eps))
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    batches = list(task.train_batches(0, 1, cfg.seed).iter_epoch(0))[:2]
    x, y = torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
    ((model(x).squeeze(-1) - y) ** 2).mean().backward()
    expected = {f"{name}": p.detach() - lr * p.grad / (p.grad.abs() + eps) for name, p in model.named_parameters()}
    _run(task, cfg, tmp_path)
    got = _weights(tmp_path / "last")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-7, rtol=1e-5)


def test_resume_gives_the_same_parameters_as_a_straight_run(tmp_path):
    task = RegressionTask(dropout=0.3)  # dropout consumes the RNG: its state must be restored too
    _run(task, _cfg(max_updates=12), tmp_path / "straight")
    _run(RegressionTask(dropout=0.3), _cfg(max_updates=6), tmp_path / "resumed")
    summary = _run(RegressionTask(dropout=0.3), _cfg(max_updates=12), tmp_path / "resumed")
    assert summary["resumes"] == 1 and summary["updates"] == 12
    a, b = _weights(tmp_path / "straight" / "last"), _weights(tmp_path / "resumed" / "last")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_non_finite_updates_are_skipped_and_counted(tmp_path):
    summary = _run(RegressionTask(nan_at=(1, 3)), _cfg(max_updates=8), tmp_path)
    assert summary["updates"] == 8
    assert summary["nonfinite_skipped"] == 2
    for value in _weights(tmp_path / "last").values():
        assert torch.isfinite(value).all()


def test_a_run_of_non_finite_updates_aborts_naming_the_last_good_checkpoint(tmp_path):
    cfg = _cfg(max_updates=20, max_nonfinite=3, checkpoint_every=2)
    with pytest.raises(SpeechSSLError) as info:
        _run(RegressionTask(num_batches=12, nan_at=(5, 6, 7, 8)), cfg, tmp_path)
    message = str(info.value)
    assert "3 updates in a row" in message
    assert "checkpoint_00000004" in message


def test_truncated_checkpoint_is_never_picked_up(tmp_path):
    _run(RegressionTask(), _cfg(max_updates=8), tmp_path)
    newest = tmp_path / "checkpoint_00000008"
    assert ckpt.is_complete(newest)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # interrupted mid-write
    assert not ckpt.is_complete(newest)
    assert Path(ckpt.latest_complete(tmp_path)).name == "checkpoint_00000004"
    # A directory that never got its marker (killed before rank 0 finished) is skipped too.
    (tmp_path / "checkpoint_00000009").mkdir()
    summary = _run(RegressionTask(), _cfg(max_updates=10), tmp_path)
    assert summary["resumes"] == 1 and summary["updates"] == 10


def test_last_k_and_best_are_kept(tmp_path):
    _run(RegressionTask(), _cfg(max_updates=16, checkpoint_every=2, keep_last=2), tmp_path)
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*"))
    assert names[-2:] == ["checkpoint_00000014", "checkpoint_00000016"]
    best = (tmp_path / "best").resolve().name
    assert best in names and len(names) <= 3
    assert (tmp_path / "last").resolve().name == "checkpoint_00000016"
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "curves.png").exists()


def test_lr_schedules():
    tri = lr_multiplier(OptimConfig(schedule="tri_stage", warmup_ratio=0.1, hold_ratio=0.4, decay_ratio=0.5,
                                    final_lr_scale=0.05), max_updates=100)
    assert tri(0) == pytest.approx(0.1) and tri(9) == pytest.approx(1.0)
    assert tri(10) == 1.0 and tri(49) == 1.0
    assert tri(50) == pytest.approx(1.0) and tri(100) == pytest.approx(0.05)
    assert tri(75) == pytest.approx(math.sqrt(0.05), rel=1e-6)  # halfway through the exponential decay
    lin = lr_multiplier(OptimConfig(schedule="linear", warmup_updates=10, final_lr_scale=0.0), max_updates=110)
    assert lin(4) == pytest.approx(0.5) and lin(10) == pytest.approx(1.0) and lin(60) == pytest.approx(0.5)
    assert lin(110) == pytest.approx(0.0)


def test_nested_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "tuple": (1, 2.5, "x"), "inf": float("inf"), "none": None}
    ckpt.save_nested(tmp_path / "s.safetensors", state)
    back = ckpt.load_nested(tmp_path / "s.safetensors")
    assert back["tuple"] == (1, 2.5, "x") and back["inf"] == float("inf") and back["none"] is None
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["opt"])
    for k, v in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(opt2.state_dict()["state"][0][k], v)


@pytest.mark.slow  # torch.compile of the loop (test_models_compile.py compiles the model itself)
@pytest.mark.timeout(300)
def test_compile_gives_the_eager_run(tmp_path):
    """trainer.compile=true: the loop trains the compiled model (the task's model compiled in place, so
    checkpoints keep their keys) and ends where the eager run ends."""
    _run(RegressionTask(), _cfg(max_updates=6, checkpoint_every=6), tmp_path / "eager")
    _run(RegressionTask(), _cfg(max_updates=6, checkpoint_every=6, compile=True), tmp_path / "compiled")
    a, b = _weights(tmp_path / "eager" / "last"), _weights(tmp_path / "compiled" / "last")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    """precision=bf16 on a CPU (what auto picks where the CPU has native bf16): the loop runs its steps
    and validation under autocast and the loss falls as in fp32."""
    summaries = {p: _run(RegressionTask(num_batches=60), _cfg(max_updates=60, precision=p, validate_every=60,
                                                          checkpoint_every=60), tmp_path / p)
                 for p in ("fp32", "bf16")}
    lines = {p: [json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()] for p in summaries}
    valid = {p: [r["valid_loss"] for r in rows if r["split"] == "valid"][-1] for p, rows in lines.items()}
    first = {p: [r["loss"] for r in rows if r["split"] == "train"][0] for p, rows in lines.items()}
    for p in summaries:
        assert valid[p] < 0.2 * first[p], (p, valid[p], first[p])
    assert abs(valid["bf16"] - valid["fp32"]) < 0.1 * valid["fp32"] + 0.02, valid
    assert valid["bf16"] != valid["fp32"]  # bf16 rounding shows: autocast was on, in training and validation


def _safetensors_full_disk() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("full", [lambda: OSError(28, "No space left on device"), _safetensors_full_disk],
                         ids=["oserror", "safetensors"])
def test_a_full_disk_is_one_error_naming_the_intact_checkpoint_and_the_rerun_resumes(tmp_path, full):
    class FullAfterFirst(LocalContext):
        saves = 0

        def save_checkpoint(self, name, write, metrics):
            FullAfterFirst.saves += 1
            if FullAfterFirst.saves > 1:
                raise full()
            return super().save_checkpoint(name, write, metrics)

    with pytest.raises(SpeechSSLError) as info:
        train(RegressionTask(), _cfg(max_updates=12), FullAfterFirst(str(tmp_path)), tmp_path)
    message = str(info.value)
    assert "no space left" in message and "checkpoint_00000008" in message
    assert f"newest complete checkpoint is {tmp_path / 'checkpoint_00000004'}" in message
    summary = _run(RegressionTask(), _cfg(max_updates=12), tmp_path)  # space freed: the same run resumes
    assert summary["resumes"] == 1 and summary["updates"] == 12
