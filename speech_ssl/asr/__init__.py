"""Speech recognition on top of CTC models: decoding (greedy, lexicon beam search) and WER/CER."""
