"""What the benchmarks share with each other and with the tests: the repository's root."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
