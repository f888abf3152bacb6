"""Corpus embedding: the Ray-free batch function (``Embedder``), Parquet shards, and the Ray Data pipeline
behind ``speech-ssl embed`` (``embed_corpus``)."""

from speech_ssl.embed.embedder import Embedder, exact_features, masked_channel_norm, resolve_layers

__all__ = ["Embedder", "exact_features", "masked_channel_norm", "resolve_layers", "embed_corpus"]


def embed_corpus(cfg):
    """``speech-ssl embed`` as a function (``cfg``: ``speech_ssl.stages.embed.Config``); returns the summary."""
    from speech_ssl.embed.pipeline import embed_corpus as run

    return run(cfg)
