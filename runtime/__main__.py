"""``python -m runtime``: the same command line as ``diffusion-runtime``."""
import sys

from runtime.cli import main

sys.exit(main())
