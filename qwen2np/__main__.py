"""`python -m qwen2np ...` is the `qwen2np` command."""

import sys

from .cli import main

sys.exit(main())
