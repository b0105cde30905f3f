"""`GET /metrics`: Prometheus text, read from the registry and the router at scrape time.

A custom collector rather than metric objects updated in place: models come and go, and a
gauge set on a model that was since unloaded would be reported forever. Only the load
duration histogram accumulates, from the events of workers becoming ready.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .events import ModelEvent, Subscription
from .lifecycle import ModelLifecycle
from .registry import ModelRegistry
from .router import LATENCY_BUCKETS_S, RouterStats
from .states import ModelStatus, WorkerState

LOAD_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class NodeCollector(Collector):
    def __init__(self, registry: ModelRegistry, started_at: float) -> None:
        self.registry = registry
        self.stats = RouterStats()  # the router's, once the app exists (Metrics.attach)
        self.started_at = started_at  # monotonic

    def collect(self) -> Iterator[Metric]:
        records = self.registry.models()
        uptime = GaugeMetricFamily("neuron_uptime_seconds", "Seconds since the supervisor started.")
        uptime.add_metric([], time.monotonic() - self.started_at)
        yield uptime

        status = GaugeMetricFamily(
            "neuron_model_status", "1 for the status each model is in, 0 for the others.",
            labels=["model", "status"])
        restarts = CounterMetricFamily(
            "neuron_model_restarts", "Restarts of the model's worker since it was loaded.",
            labels=["model"])
        rss = GaugeMetricFamily(
            "neuron_worker_resident_memory_bytes", "Resident memory of the model's worker.",
            labels=["model"])
        for record in records:
            for value in ModelStatus:
                status.add_metric([record.model_id, value.value], float(record.status is value))
            restarts.add_metric([record.model_id], record.restarts)
            memory = _rss(record)
            if memory is not None:
                rss.add_metric([record.model_id], memory)
        yield status
        yield restarts
        yield rss

        requests = CounterMetricFamily(
            "neuron_requests", "Requests through /v1 naming the model, by HTTP status.",
            labels=["model", "code"])
        in_flight = GaugeMetricFamily(
            "neuron_requests_in_flight", "Requests forwarded to the model's worker, not done.",
            labels=["model"])
        latency = HistogramMetricFamily(
            "neuron_request_duration_seconds",
            "Time from a /v1 request reaching the router to the last byte of its answer.",
            labels=["model"])
        for model_id, counters in sorted(self.stats.models.items()):
            for code, count in sorted(counters.responses.items()):
                requests.add_metric([model_id, str(code)], count)
            in_flight.add_metric([model_id], counters.in_flight)
            cumulative, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS_S, counters.latency_counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([model_id], buckets, counters.latency_sum_s)
        yield requests
        yield in_flight
        yield latency


def _rss(record: ModelLifecycle) -> int | None:
    worker = record.worker
    if worker is None or worker.pid is None or worker.returncode is not None:
        return None
    try:
        return int(psutil.Process(worker.pid).memory_info().rss)
    except psutil.Error:
        return None


class Metrics:
    """The node's metrics, in a registry of their own (never the process-global one).

    `since` is a subscription to the node's events taken before activation (the daemon
    imports this module only once the first worker is on its way): the default models'
    loads in it are counted, then the metrics follow the events themselves."""

    def __init__(self, registry: ModelRegistry, started_at: float | None = None,
                 since: Subscription | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._collector = NodeCollector(
            registry, time.monotonic() if started_at is None else started_at)
        self.registry.register(self._collector)
        self.load_duration = Histogram(
            "neuron_model_load_duration_seconds",
            "Spawn to ready of a worker, for first loads and restarts alike.",
            ["model"], buckets=LOAD_BUCKETS_S, registry=self.registry)
        if since is not None:
            for event in since.pending():
                self.observe(event)
            since.close()
        self.unsubscribe = registry.events.on_event(self.observe)

    def attach(self, stats: RouterStats) -> None:
        self._collector.stats = stats

    def observe(self, event: ModelEvent) -> None:
        if event.new is WorkerState.READY and event.ready_s is not None:
            self.load_duration.labels(event.model).observe(event.ready_s)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
