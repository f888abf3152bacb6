"""The model, the embedder and the GPU benchmark modes import (and run) with nothing but torch installed.

A GPU machine may have torch (and torchaudio, transformers) but none of Ray, soundfile, Hydra, OmegaConf,
pyarrow, safetensors, jiwer; numpy may be missing too. Each test runs a fresh interpreter whose first
``sys.meta_path`` finder refuses those packages (``ModuleNotFoundError``, as if not installed), then
imports and runs the code a GPU user needs, and checks that none of them was imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("ray", "soundfile", "hydra", "omegaconf", "pyarrow", "safetensors", "jiwer", "tensorboard",
            "torchaudio", "transformers")

PRELUDE = """
import importlib.abc
import sys

BLOCKED = set({blocked!r})
early = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not early, f"imported before the test started (site?): {{early}}"


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused by test_lazy_imports)", name=name)
        return None


sys.meta_path.insert(0, Refuse())
sys.path[:0] = [{root!r}, {benchmarks!r}]


def check_clean():
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, f"imported anyway: {{leaked}}"
"""


def run_without(blocked: tuple[str, ...], body: str) -> str:
    prelude = PRELUDE.format(blocked=sorted(blocked), root=str(ROOT), benchmarks=str(ROOT / "benchmarks"))
    code = prelude + textwrap.dedent(body) + "\ncheck_clean()\nprint('OK')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("OK"), (
        f"exit {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}")
    return out.stdout


def test_blocker_refuses():
    """The harness itself: a refused package raises ModuleNotFoundError (so the tests below can fail)."""
    run_without(("soundfile",), """
        try:
            import soundfile  # noqa: F401
        except ModuleNotFoundError as err:
            assert err.name == "soundfile"
        else:
            raise AssertionError("soundfile was imported")
    """)


def test_models_and_model_benchmark_without_numpy():
    """speech_ssl.models (build tiny, forward + backward) and bench_model's GPU mode: torch alone."""
    run_without(OPTIONAL + ("numpy",), """
        import torch

        import speech_ssl.models as models
        from speech_ssl.models import build, build_ctc, load, save_model  # noqa: F401

        torch.manual_seed(0)
        model = build("tiny").train()
        out = model(0.1 * torch.randn(2, 8000))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        enc = model.encoder.eval()
        with torch.no_grad():
            assert enc(0.1 * torch.randn(1, 8000)).last_hidden_state.shape[0] == 1

        # saving needs safetensors: a clear error naming it, not an ImportError at import time
        import tempfile

        from speech_ssl.errors import SpeechSSLError
        try:
            save_model(model, tempfile.mkdtemp())
        except SpeechSSLError as err:
            assert "safetensors" in str(err), err
        else:
            raise AssertionError("save_model without safetensors did not complete nor fail")

        import speech_ssl.precision  # noqa: F401
        import bench_model

        args = bench_model.parse_args(["--device", "cuda", "--dtype", "bf16", "--compile", "--batch", "16"])
        assert args.device == "cuda" and args.compile
        import bench_embed

        args = bench_embed.parse_args(["--gpu"])
        assert args.gpu
    """)


def test_embedder_and_embed_benchmark_without_decoders():
    """Embedder and bench_embed --gpu (run here on the CPU, a few seconds of audio): no soundfile, Ray,
    pyarrow, safetensors, transformers or torchaudio (numpy allowed: the embedder returns numpy arrays)."""
    stdout = run_without(OPTIONAL, """
        import json

        import torch

        from speech_ssl.embed import Embedder
        from speech_ssl.models import build

        torch.manual_seed(0)
        embedder = Embedder(build("tiny"), layers=[-1])
        out = embedder(0.1 * torch.randn(2, 8000), torch.tensor([8000, 6000]))
        assert len(out) == 2

        import bench_embed

        args = bench_embed.parse_args(["--gpu", "--device", "cpu", "--precision", "fp32", "--model", "tiny",
                                       "--seconds", "6", "--gpu-batch-seconds", "4", "--warmup", "0",
                                       "--repeats", "1"])
        result = bench_embed.run_gpu(args)
        print(json.dumps(result))
        assert result["runs"][0]["x_real_time"] > 0
    """)
    assert "transformers" in stdout  # the side-by-side run says why it was skipped


def test_embedder_imports_without_numpy():
    run_without(OPTIONAL + ("numpy",), """
        from speech_ssl.embed import Embedder  # noqa: F401
    """)
