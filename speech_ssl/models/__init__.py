"""The wav2vec 2.0 model family (pure PyTorch: no Ray, no Hydra)."""
