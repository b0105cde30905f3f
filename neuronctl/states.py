"""Model states as the API, the CLI and the registry see them.

This module imports nothing from the package so every layer can share it.
"""

from __future__ import annotations

import enum


class ModelStatus(str, enum.Enum):
    """The `status` of one model in `GET /models`.

    The values are wire-compatible with the original service; never rename one.
    """

    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# A model in one of these states owns (or is about to own) a worker process.
ACTIVE_STATES = frozenset({ModelStatus.LOADING, ModelStatus.LOADED, ModelStatus.UNLOADING})
