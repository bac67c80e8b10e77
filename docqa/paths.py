"""Where docqa keeps what it makes for itself outside the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """docqa's cache: ``$DOCQA_CACHE_DIR``, by default ``~/.cache/docqa`` (exported query
    encoders under ``embedders/``, models made from the embedded one under ``models/``)."""
    return Path(os.environ.get("DOCQA_CACHE_DIR", "~/.cache/docqa")).expanduser()
