"""Named model presets (filled in by the model work; names are part of the command-line contract)."""

PRESET_NAMES = ["tiny", "fbank-tiny", "base", "large", "large-lv60k"]
