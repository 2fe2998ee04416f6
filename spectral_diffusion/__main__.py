"""``python -m spectral_diffusion``: see ``spectral_diffusion.frontends.cli``."""

import sys

from spectral_diffusion.frontends.cli import main

if __name__ == "__main__":
    sys.exit(main())
