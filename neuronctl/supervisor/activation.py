"""Activation: bring up the configured default models before the API listens."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import ModelSpec
from ..errors import NeuronError
from .registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationResult:
    model_id: str
    elapsed_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ActivationObserver(Protocol):
    """Told about each entry as activation goes (systemd's STATUS= line uses this)."""

    def before(self, index: int, total: int, spec: ModelSpec) -> None: ...

    def after(self, index: int, total: int, result: ActivationResult) -> None: ...


async def load_default_models(
    registry: ModelRegistry,
    specs: Sequence[ModelSpec],
    observer: ActivationObserver | None = None,
) -> list[ActivationResult]:
    """Load each spec in turn, waiting for each to be ready before the next.

    Sequential on purpose: parallel loads contend for VRAM. A failure is a warning and the
    next entry is still tried. An empty list returns at once without logging anything.
    """
    results: list[ActivationResult] = []
    total = len(specs)
    for index, spec in enumerate(specs, start=1):
        if observer:
            observer.before(index, total, spec)
        # A reload loads changed catalogue models through here too: name them as such.
        config = registry.config
        kind = ("catalogue model" if spec.model_id in config.catalogue()
                and not config.is_default(spec.model_id) else "default model")
        started = time.monotonic()
        error: str | None = None
        try:
            await registry.load(spec)
        except NeuronError as exc:  # a load that failed, or a conflicting one
            error = exc.message
        except Exception as exc:  # a bug must not keep the other models down
            log.warning("%s %s: unexpected error", kind, spec.model_id, exc_info=True)
            error = f"unexpected error: {exc!r}"
        result = ActivationResult(spec.model_id, time.monotonic() - started, error)
        if result.ok:
            log.info("loaded %s %s in %.2f s", kind, spec.model_id, result.elapsed_s)
        else:
            log.warning(
                "%s %s failed after %.2f s: %s",
                kind, spec.model_id, result.elapsed_s, error,
            )
        results.append(result)
        if observer:
            observer.after(index, total, result)
    return results
