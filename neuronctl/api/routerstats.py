"""The router's counters: per model, what became of its `/v1` requests, its queue, and the
latency and queue-wait histograms; read by `/metrics`, `/models/stats`, eviction and the
idle unloader, written only by the router.

An entry exists only for a model the node knows, and an ad-hoc model's entry and series go
when it is unloaded: neither made-up names nor load/unload churn grow it without bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram

from ..errors import NeuronError
from ..events import ModelEvent
from ..states import WorkerState
from ..supervisor.eviction import IDLE, Activity
from ..supervisor.registry import ModelRegistry
from .traffic import ModelQueue, QueuedBytes

# Upper bounds, in seconds (prometheus-client adds +Inf, which catches a long stream).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0)
QUEUE_BUCKETS_S = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


@dataclass
class ModelStats:
    """What the router did for one model; read by a metrics endpoint, written only here."""

    queue: ModelQueue
    requests: int = 0  # every request naming this model, whatever became of it
    in_flight: int = 0  # forwarded to the worker and not yet answered in full
    worker_errors: int = 0  # the worker could not be reached or broke off its answer
    client_disconnects: int = 0  # the client left before the answer was complete
    # Generated tokens: a JSON answer's usage.completion_tokens, a stream's `data: {` chunks
    # (llama.cpp servers send one token per chunk). For the dashboard's tokens/s.
    tokens: int = 0
    last_used: float = 0.0  # monotonic time a request last arrived or finished (eviction)
    responses: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    rejections: dict[str, int] = field(default_factory=dict)  # the router's refusals, by code

    def count(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def reject(self, refusal: NeuronError) -> None:
        self.count(refusal.status)
        self.rejections[refusal.code] = self.rejections.get(refusal.code, 0) + 1


class RouterStats:
    """Per-model counters and queues. Only models the node knows get an entry, so a client
    naming made-up models cannot grow this without bound, and an ad-hoc model's entry and
    series go when it is unloaded (`forget`), so load/unload churn cannot either. The two
    histograms live in `registry`, the node's metrics registry (or one of their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.models: dict[str, ModelStats] = {}
        self.queued_bytes = QueuedBytes()  # what every model's queue holds, together
        self.registry = registry or CollectorRegistry()
        self.latency = Histogram(
            "neuron_request_duration_seconds",
            "Time from a /v1 request reaching the router to the last byte of its answer.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.queue_wait = Histogram(
            "neuron_request_queue_seconds",
            "Time a /v1 request waited in its model's queue for a slot of the worker.",
            ["model"], buckets=QUEUE_BUCKETS_S, registry=self.registry)

    def activity(self, model_id: str) -> Activity:
        """What eviction needs to know of a model's traffic, right now."""
        stats = self.models.get(model_id)
        if stats is None:
            return IDLE
        return Activity(max(stats.in_flight, stats.queue.in_flight), stats.queue.queued,
                        stats.last_used)

    def model(self, model_id: str) -> ModelStats:
        stats = self.models.get(model_id)
        if stats is None:
            queue = ModelQueue(model_id, time.monotonic, budget=self.queued_bytes)
            stats = self.models[model_id] = ModelStats(queue)
        return stats

    def observe(self, histogram: Histogram, model_id: str, stats: ModelStats,
                seconds: float) -> None:
        """Observe for a model whose counters are still kept: a request that ends after
        its ad-hoc model was forgotten must not bring its series back."""
        if self.models.get(model_id) is stats:
            histogram.labels(model_id).observe(seconds)

    def forget(self, model_id: str) -> None:
        self.models.pop(model_id, None)
        for histogram in (self.latency, self.queue_wait):
            histogram.remove(model_id)


def unloaded_for_good(registry: ModelRegistry, event: ModelEvent) -> bool:
    """Whether `event` ends an ad-hoc model (one not in the catalogue): stopped, with no
    newer lifecycle of its id. Its counters and series go with it; a catalogue model keeps
    its own across unloads, as dashboards follow it by name."""
    if event.new is not WorkerState.STOPPED or event.model in registry.catalogue:
        return False
    current = registry.get(event.model)  # still listed while its stop completes
    return current is None or current.state is WorkerState.STOPPED
