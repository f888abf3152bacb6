"""The demo corpus that ships in the package (see README.md here)."""

from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


def corpus_path(name: str = "") -> str:
    """Absolute path of a file or split inside the demo corpus, e.g. ``corpus_path("test.jsonl")``."""
    path = CORPUS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"demo corpus has no {name!r} (looked in {CORPUS_DIR})")
    return str(path)
