"""Chained pipelines over the library's stages (``speech-ssl run pipeline=<name>``).

Each pipeline module is a short definition: ``stages(cfg, published=None)`` wires the stage configs of a
:class:`speech_ssl.stages.run.Config` into a list of :class:`speech_ssl.pipeline.Stage` (every stage in
``<output_dir>/<stage>/``, later stages reading earlier outputs by path), and ``summarize(output_dir,
results)`` says what the run found and where its outputs are. The runner that skips, resumes and stops on
failure is :func:`speech_ssl.pipeline.run_pipeline`.

* ``pretrain_finetune``: prepare -> pretrain -> finetune -> evaluate -> embed
* ``embed_corpus``: prepare -> embed (with a checkpoint you give)
"""

from __future__ import annotations

import importlib
from types import ModuleType

PIPELINES: dict[str, str] = {
    "pretrain_finetune": "pipelines.pretrain_finetune",
    "embed_corpus": "pipelines.embed_corpus",
}


def names() -> list[str]:
    return list(PIPELINES)


def load(name: str) -> ModuleType:
    """The definition module of pipeline ``name`` (``stages(cfg, published)``, ``summarize(output_dir, results)``)."""
    from speech_ssl.config import ConfigError

    if name not in PIPELINES:
        raise ConfigError("pipeline", f"unknown pipeline '{name}'.", names())
    return importlib.import_module(PIPELINES[name])
