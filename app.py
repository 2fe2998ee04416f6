"""Spectral Diffusion web app: ``python app.py --help``. The app is the ``webapp`` package."""

import sys

from webapp.main import main

if __name__ == "__main__":
    sys.exit(main())
