"""The shape of a concept name, written once: library folder names and default trigger tokens share it.

A concept name is 1 to ``NAME_MAX_LENGTH`` lowercase letters, digits, ``-`` and ``_``, starting with a
letter or digit; its default trigger token is ``<name>``, so the token rule (``core.tokens``) is built
from this one. The library (``library.names``) adds what only folders need (no Windows device names)
and the messages that say what is wrong.
"""

from __future__ import annotations

NAME_MAX_LENGTH = 64
NAME_PATTERN = rf"[a-z0-9][a-z0-9_-]{{0,{NAME_MAX_LENGTH - 1}}}"
