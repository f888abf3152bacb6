"""A fine-tuned CTC checkpoint as a recogniser: planned batches of audio in, transcripts out.

``Recognizer.load(checkpoint, decoder, beam)`` reads what fine-tuning saves beside the weights:

* ``vocab.json``: the CTC vocabulary (transformers' tokenizer format; an exported directory has it too);
* ``text_config.json``: the transcript normaliser the model was trained with (references are scored
  after the same normalisation);
* ``lexicon_words.json``: the words of the training transcripts, beam search's default lexicon.

``recognize(stream)`` runs the model over a :class:`~speech_ssl.data.BatchStream` (padded batches, in
plan order; decoded in-process or by Ray Data tasks) and yields one :class:`Transcript` per utterance,
timing the data wait, the forward pass and the search separately (``timing``).
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from speech_ssl.asr.decoding import BeamConfig, build_decoder
from speech_ssl.config import ConfigError, from_dict
from speech_ssl.data import BatchStream, DataConfig, TextConfig, TextNormalizer, Utterance, Vocabulary
from speech_ssl.data.model_inputs import inference_data, model_batch_stream
from speech_ssl.errors import SpeechSSLError
from speech_ssl.precision import autocast, resolve_precision

log = logging.getLogger(__name__)

TEXT_CONFIG_FILE = "text_config.json"
LEXICON_WORDS_FILE = "lexicon_words.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (or file); a fine-tuning run's ``output_dir`` means its ``best`` checkpoint.
    A URI is downloaded (``storage.fetched``): the checkpoint itself, or a run's best/last, not the run."""
    from speech_ssl import storage

    if storage.is_uri(path):
        uri = storage.normalize(path)
        if not storage.exists(uri):
            raise SpeechSSLError(f"no checkpoint at {path}")
        if storage.is_dir(uri) and not storage.exists(storage.join(uri, "config.json")):
            uri = next((storage.join(uri, sub) for sub in ("best", "last")
                        if storage.exists(storage.join(uri, sub, "config.json"))), uri)
        return storage.fetched(uri)
    p = Path(path).expanduser()
    if not p.exists():
        raise SpeechSSLError(f"no checkpoint at {path}")
    if p.is_dir() and not (p / "config.json").is_file():
        for sub in ("best", "last"):
            if (p / sub / "config.json").is_file():
                log.info("%s is a training run: using its %s checkpoint (%s)", p, sub, (p / sub).resolve().name)
                return p / sub
    return p


def read_text_config(directory: Path) -> Optional[TextConfig]:
    path = directory / TEXT_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return from_dict(TextConfig, json.loads(path.read_text()), "text_config")
    except (json.JSONDecodeError, ConfigError) as err:
        raise SpeechSSLError(f"{path}: not a valid text configuration ({err})") from None


def read_lexicon_words(directory: Path) -> Optional[list[str]]:
    path = directory / LEXICON_WORDS_FILE
    if not path.is_file():
        return None
    words = json.loads(path.read_text())
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise SpeechSSLError(f"{path}: expected a JSON list of words")
    return words


def prefetch(items: Iterator, depth: int) -> Iterator:
    """``items`` produced by a background thread, at most ``depth`` ahead (decoding with soundfile and
    torch releases the GIL, so it overlaps the forward pass). Exceptions surface in the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("done", done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            slots.put(("error", err))

    worker = threading.Thread(target=produce, name="speech-ssl-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=5)


@dataclass
class Transcript:
    """One utterance's result. ``reference`` is the normalised transcript when the input had one."""

    id: str
    path: str
    text: str
    reference: Optional[str]
    seconds: float


class Recognizer:
    """A CTC model in eval mode with its vocabulary, transcript normaliser and decoder."""

    def __init__(self, model: torch.nn.Module, vocab: Vocabulary, text: TextConfig, decoder_kind: str = "greedy",
                 beam: Optional[BeamConfig] = None, lexicon_words: Optional[Sequence[str]] = None,
                 device: Optional[torch.device] = None, source: str = "", precision: str = "auto"):
        if getattr(model, "vocab_size", None) != len(vocab):
            raise SpeechSSLError(f"{source or 'the model'}: the CTC head has {getattr(model, 'vocab_size', '?')} "
                                 f"outputs but vocab.json {len(vocab)} tokens")
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        # bf16 autocast on GPUs and on CPUs with native bf16 (speech_ssl.precision); CTC logits are read in fp32.
        self.precision = resolve_precision(precision, self.device, "precision")
        self.vocab = vocab
        self.text = text
        self.normalizer = TextNormalizer(text)
        self.decoder_kind = decoder_kind
        self.source = source
        self._workdir = tempfile.TemporaryDirectory(prefix="speech-ssl-decoder-")  # the lexicon file lives here
        self.decoder = build_decoder(decoder_kind, vocab, beam, lexicon_words, Path(self._workdir.name))
        self.timing = {"data_seconds": 0.0, "forward_seconds": 0.0, "decode_seconds": 0.0}

    @classmethod
    def load(cls, checkpoint: str | Path, decoder: str = "greedy", beam: Optional[BeamConfig] = None,
             fallback_text: Optional[TextConfig] = None, device: Optional[torch.device] = None,
             precision: str = "auto") -> "Recognizer":
        """A recogniser from a fine-tuned checkpoint directory (ours, a fine-tuning run's output_dir, or a
        transformers CTC directory with its vocab.json)."""
        from speech_ssl.models import Wav2Vec2ForCTC, load

        path = resolve_checkpoint(checkpoint)
        model = load(path)
        if not isinstance(model, Wav2Vec2ForCTC):
            raise SpeechSSLError(f"{checkpoint} holds a {type(model).__name__}, not a fine-tuned CTC model: "
                                 "fine-tune it first (speech-ssl finetune init=<this checkpoint> ...)")
        directory = path if path.is_dir() else path.parent
        if not (directory / "vocab.json").is_file():
            raise SpeechSSLError(f"{directory}: no vocab.json beside the model (the CTC vocabulary it was "
                                 "fine-tuned with)")
        vocab = Vocabulary.load(directory, unknown="drop")
        text = read_text_config(directory)
        if text is None:
            text = fallback_text or TextConfig()
            log.info("%s has no %s: transcripts are normalised with data.text", directory, TEXT_CONFIG_FILE)
        return cls(model, vocab, text, decoder, beam, read_lexicon_words(directory), device, str(path), precision)

    # -- data ------------------------------------------------------------------------------------------
    def batches(self, utterances: Sequence[Utterance], data: DataConfig, use_ray: bool) -> BatchStream:
        """Padded batches of ``utterances`` in length order (no shuffling), at the model's sample rate."""
        config = self.model.config
        if data.sample_rate != config.sample_rate:
            log.info("the model was trained at %d Hz: audio is resampled to it (data.sample_rate=%d ignored)",
                     config.sample_rate, data.sample_rate)
        return model_batch_stream(utterances, inference_data(data, config), config, "pad", use_ray=use_ray,
                                  normalizer=self.normalizer)

    # -- inference -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def transcribe_batch(self, inputs: torch.Tensor, lengths: Optional[torch.Tensor]) -> list[str]:
        """Transcripts of one batch of model inputs ([B, samples] or [B, frames, n_mels])."""
        t0 = time.perf_counter()
        with autocast(self.device, self.precision):
            out = self.model(inputs.to(self.device), None if lengths is None else lengths.to(self.device))
        logits = out.logits.float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        hyps = self.decoder(logits.cpu(), out.lengths.cpu())
        self.timing["forward_seconds"] += t1 - t0
        self.timing["decode_seconds"] += time.perf_counter() - t1
        return hyps

    def recognize(self, stream: BatchStream) -> Iterator[Transcript]:
        """One Transcript per usable utterance of ``stream``'s first epoch (quarantined rows are in
        ``stream.report``). In-process streams decode the next batches in a thread while the model runs."""
        unit = stream.spec.unit_seconds
        batches = stream.iter_epoch(0)
        if not stream.use_ray:
            batches = prefetch(batches, max(1, stream.cfg.prefetch_batches))
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.timing["data_seconds"] += time.perf_counter() - t0
            if batch is None:
                return
            hyps = self.transcribe_batch(batch.inputs, batch.lengths)
            for k, hyp in enumerate(hyps):
                yield Transcript(id=batch.ids[k], path=batch.paths[k], text=hyp, reference=batch.texts[k],
                                 seconds=float(batch.lengths[k]) * unit)
