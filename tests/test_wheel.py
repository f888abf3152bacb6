"""The built wheel works anywhere: built from the files a clone would have, installed into a fresh virtual
environment, and run from a directory outside the checkout: every command's --help, then a tiny pretrain
and a fine-tune from it on generated audio.

The fresh environment gets the dependencies from the running interpreter's site-packages through a path
entry (a ``.pth`` line), so no network is needed and the checkout's editable install (a ``.pth`` import
hook that would quietly fill in anything missing from the wheel) stays out of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from audio_factory import make_corpus, make_toy_asr_corpus, toy_words
from speech_ssl.stages import COMMANDS  # the list only: the commands themselves run from the wheel

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _sh(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _clone_files(dest: Path) -> Path:
    """The files a clone of this checkout (with its uncommitted changes) would have, symlinks kept: what the
    build sees from a fresh `git clone`, without the checkout's build/ or *.egg-info leftovers."""
    if (REPO / ".git").exists() and shutil.which("git"):
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
        for name in filter(None, names):
            src, dst = REPO / name, dest / name
            if not src.is_symlink() and not src.exists():
                continue  # deleted in the working tree, not yet in git
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)
    else:
        shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, speech-ssl script, site-packages, environment) of a fresh venv holding only the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _clone_files(tmp / "src")
    dist = tmp / "dist"
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", dist, src], cwd=tmp, timeout=300)
    (wheel,) = dist.glob("speech_ssl-*.whl")

    env_dir = tmp / "env"
    _sh([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=tmp)
    python = env_dir / "bin" / "python"
    site = Path(_sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    _sh([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        cwd=tmp, timeout=300)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    return python, env_dir / "bin" / "speech-ssl", site, env


@pytest.fixture
def elsewhere(tmp_path_factory):
    """A working directory outside the checkout."""
    path = tmp_path_factory.mktemp("elsewhere")
    assert REPO not in path.resolve().parents
    return path


def test_installed_wheel_imports_its_own_copy_with_configs_and_demo_corpus(installed, elsewhere):
    python, _, site, env = installed
    probe = ("import json, speech_ssl, pipelines; from speech_ssl.cli import CONF_DIR; "
             "from speech_ssl.demo import corpus_path; "
             "print(json.dumps([speech_ssl.__file__, pipelines.__file__, str(CONF_DIR), corpus_path('test.jsonl')]))")
    paths = [Path(p) for p in json.loads(_sh([python, "-c", probe], cwd=elsewhere, env=env).stdout.splitlines()[-1])]
    for path in paths:
        assert site in path.parents, f"{path} is not from the installed wheel in {site}"
        assert REPO not in path.parents
    assert (paths[2] / "pretrain" / "recipe" / "cpu_tiny.yaml").is_file()


def test_every_command_help_from_outside_the_checkout(installed, elsewhere):
    """The installed `speech-ssl` script's own --help and one command's; then every command's --help in one
    process of the fresh environment (a process per command would take a minute on 2 cores)."""
    python, script, site, env = installed
    top = _sh([script, "--help"], cwd=elsewhere, env=env).stdout
    assert f"configs live in {site / 'speech_ssl' / 'conf'}." in " ".join(top.split())
    assert all(f"  {name} " in top for name in COMMANDS)
    assert _sh([script, "pretrain", "--help"], cwd=elsewhere, env=env).stdout.startswith("usage: speech-ssl pretrain")
    each = ("import contextlib, io, json, sys; from speech_ssl.cli import main\n"
            "out = {}\n"
            "for name in sys.argv[1:]:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        code = main([name, '--help'])\n"
            "    out[name] = [code, buf.getvalue()]\n"
            "print(json.dumps(out))\n")
    helps = json.loads(_sh([python, "-c", each, *sorted(COMMANDS)], cwd=elsewhere, env=env).stdout.splitlines()[-1])
    for name in COMMANDS:
        code, text = helps[name]
        assert code == 0 and text.startswith(f"usage: speech-ssl {name}"), (name, code, text[:500])
        assert "configuration (conf/" in text, (name, text[:500])


def test_tiny_pretrain_then_finetune_from_outside_the_checkout(installed, elsewhere):
    _, script, _, env = installed
    unlabeled = make_corpus(elsewhere / "data", n=6, min_seconds=1.2, max_seconds=2.0, split="unlabeled", seed=3)
    words = toy_words(6, seed=2)
    train = make_toy_asr_corpus(elsewhere / "data", n=6, seed=0, split="train", words=words)
    valid = make_toy_asr_corpus(elsewhere / "data", n=2, seed=1, split="valid", words=words)
    ray = ["ray.num_cpus=2", "ray.include_dashboard=false", "ray.object_store_memory_mb=200"]
    trainer = ["trainer.num_workers=0", "trainer.max_updates=2", "trainer.log_every=1", "trainer.checkpoint_every=2",
               "trainer.validate_every=0"]

    _sh([script, "pretrain", "output_dir=runs/pt", "model=fbank-tiny", f"data.train={unlabeled}",
         "data.batch_seconds=4", "data.crop_duration=1.2", "trainer.optim.warmup_updates=0", *trainer, *ray],
        cwd=elsewhere, env=env, timeout=300)
    assert (elsewhere / "runs" / "pt" / "best" / "model.safetensors").is_file()
    _sh([script, "finetune", "output_dir=runs/ft", "init=runs/pt/best", f"data.train={train}", f"data.valid={valid}",
         "data.batch_seconds=6", "ctc.freeze_updates=0", *trainer, *ray], cwd=elsewhere, env=env, timeout=300)
    assert (elsewhere / "runs" / "ft" / "last" / "model.safetensors").is_file()
