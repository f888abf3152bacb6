"""``python -m speech_ssl <command> ...`` is the same as ``speech-ssl <command> ...``."""

import sys

from speech_ssl.cli import main

sys.exit(main())
