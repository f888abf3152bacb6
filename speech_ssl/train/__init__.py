"""The shared training loop (pretraining and CTC fine-tuning) and its Ray Train launcher."""

from speech_ssl.train.config import OptimConfig, TrainerConfig

__all__ = ["OptimConfig", "TrainerConfig"]
