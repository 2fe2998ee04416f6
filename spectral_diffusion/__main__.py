"""``python -m spectral_diffusion``: see ``spectral_diffusion.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
