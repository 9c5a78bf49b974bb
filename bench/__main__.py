"""``python3 -m bench``: the whole-pipeline benchmark (see bench/cli.py)."""
import sys

from .cli import main

sys.exit(main())
