"""`GET /metrics`: the node's Prometheus registry, and workers' own metrics merged in.

Gauges and counters come from a custom collector that reads the registry and the router's
counters at scrape time, rather than metric objects updated in place: models come and go,
and a gauge set on a model that was since unloaded would be reported forever. Three
histograms accumulate, per model: load duration (from the events of workers becoming
ready), and the router's request duration and queue wait (`RequestTimes`). An ad-hoc
model's series go when it is unloaded (catalogue models keep theirs), so load/unload churn
does not grow them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ..events import ModelEvent, Subscription
from ..states import ModelStatus, WorkerState
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.registry import ModelRegistry
from .keyusage import KeyUsage, KeyUsageCollector
from .traffic import RouterStats, unloaded_for_good

# Upper bounds, in seconds (prometheus-client adds +Inf, which catches a long stream).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0)
QUEUE_BUCKETS_S = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
LOAD_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
WORKER_SCRAPE_TIMEOUT_S = 1.0
WORKER_METRIC_PREFIX = "llamacpp:"

log = logging.getLogger(__name__)


class RequestTimes:
    """The router's two histograms per model, which it observes as requests end."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "neuron_request_duration_seconds",
            "Time from a /v1 request reaching the router to the last byte of its answer.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.queue_wait = Histogram(
            "neuron_request_queue_seconds",
            "Time a /v1 request waited in its model's queue for a slot of the worker.",
            ["model"], buckets=QUEUE_BUCKETS_S, registry=registry)

    def remove(self, model_id: str) -> None:
        for histogram in (self.latency, self.queue_wait):
            histogram.remove(model_id)


class NodeCollector(Collector):
    def __init__(self, registry: ModelRegistry, stats: RouterStats, started_at: float) -> None:
        self.registry = registry
        self.stats = stats
        self.started_at = started_at  # monotonic

    def collect(self) -> Iterator[Metric]:
        models = self.registry.models()
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
            "neuron_worker_resident_memory_bytes",
            "Resident memory of the model's worker (its process tree).",
            labels=["model"])
        log_unwritable = GaugeMetricFamily(
            "neuron_model_log_unwritable",
            "1 while the model's worker cannot write its log file (its output goes to the "
            "journal).", labels=["model"])
        loaded = {model.model_id for model in models}
        for model_id in self.registry.catalogue:
            if model_id not in loaded:  # a catalogue model with no lifecycle
                for value in ModelStatus:
                    status.add_metric([model_id, value.value],
                                      float(value is ModelStatus.UNLOADED))
        for model in models:
            for value in ModelStatus:
                status.add_metric([model.model_id, value.value], float(model.status is value))
            restarts.add_metric([model.model_id], model.restarts)
            log_unwritable.add_metric([model.model_id], float(model.log_problem is not None))
            memory = model.rss_bytes()
            if memory is not None:
                rss.add_metric([model.model_id], memory)
        evictions = CounterMetricFamily(
            "neuron_model_evictions", "Times the model was unloaded to make room for another, "
            "by reason (max_loaded_models, vram).", labels=["model", "reason"])
        for (model_id, reason), count in self.registry.evictions.items():
            evictions.add_metric([model_id, reason], count)
        yield evictions
        yield status
        yield restarts
        yield rss
        yield log_unwritable

        requests = CounterMetricFamily(
            "neuron_requests", "Requests through /v1 (or Ollama's /api) naming the model, by "
            "HTTP status.",
            labels=["model", "code"])
        in_flight = GaugeMetricFamily(
            "neuron_requests_in_flight", "Requests forwarded to the model's worker, not done.",
            labels=["model"])
        queued = GaugeMetricFamily(
            "neuron_requests_queued", "Requests waiting in the model's queue for a slot.",
            labels=["model"])
        rejected = CounterMetricFamily(
            "neuron_requests_rejected",
            "Requests the router answered itself, by reason (queue_full, queue_timeout, "
            "model_failed, model_not_ready, ...).", labels=["model", "reason"])
        for model_id, counters in sorted(self.stats.models.items()):
            for code, count in sorted(counters.responses.items()):
                requests.add_metric([model_id, str(code)], count)
            in_flight.add_metric([model_id], counters.in_flight)
            queued.add_metric([model_id], counters.queue.queued)
            for reason, count in sorted(counters.rejections.items()):
                rejected.add_metric([model_id, reason], count)
        queued_bytes = GaugeMetricFamily(
            "neuron_requests_queued_bytes",
            "Bytes of request bodies waiting in the node's queues, all models together "
            "(at most max_queued_bytes).")
        queued_bytes.add_metric([], self.stats.queued_bytes.held)
        yield requests
        yield in_flight
        yield queued
        yield rejected
        yield queued_bytes
        yield from self._prompt_caches()

    def _prompt_caches(self) -> Iterator[Metric]:
        """supervisor/promptcache.py's counts, and the bytes its files hold now."""
        caches = self.registry.services.prompt_caches
        if caches is None:
            return
        counts = caches.counts
        for name, help_text in (
            ("saves", "Stopped workers' slots saved (one per stop that saved any)."),
            ("restores", "Loads that restored a saved prompt cache before `loaded`."),
            ("hits", "Restores whose first answer reused cached tokens (timings.cache_n > 0)."),
            ("misses", "Restores whose first answer reused nothing (timings.cache_n 0)."),
            ("discarded", "Saved caches or files discarded: another model file, n_ctx, slots "
                          "or harness, or a file the worker refused."),
            ("evicted", "Files removed to keep to prompt_cache_bytes or "
                        "prompt_cache_model_bytes."),
        ):
            counter = CounterMetricFamily(f"neuron_prompt_cache_{name}", help_text)
            counter.add_metric([], counts[name])
            yield counter
        failures = CounterMetricFamily(
            "neuron_prompt_cache_failures", "Saves and restores that failed or gave up "
            "(a timeout, a full disk, an unwritable directory), by operation.",
            labels=["operation"])
        failures.add_metric(["save"], counts["save_failures"])
        failures.add_metric(["restore"], counts["restore_failures"])
        yield failures
        held = GaugeMetricFamily("neuron_prompt_cache_bytes",
                                 "Bytes the saved prompt caches hold on disk, all models.")
        held.add_metric([], caches.total_bytes())
        yield held


class Metrics:
    """The node's metrics, in a registry of their own (never the process-global one), over
    the model registry and the router's counters `stats`.

    `since` is a subscription to the node's events taken before activation (the daemon
    imports this module only once the first worker is on its way): the default models'
    loads in it are counted, then the metrics follow the events themselves."""

    def __init__(self, registry: ModelRegistry, stats: RouterStats,
                 started_at: float | None = None, since: Subscription | None = None) -> None:
        self.stats = stats
        self.registry = CollectorRegistry(auto_describe=True)
        self._collector = NodeCollector(
            registry, stats, time.monotonic() if started_at is None else started_at)
        self.registry.register(self._collector)
        self.key_usage = KeyUsage()  # per key: what the auth middleware saw served
        self.registry.register(KeyUsageCollector(self.key_usage))
        self.load_duration = Histogram(
            "neuron_model_load_duration_seconds",
            "Spawn to ready of a worker, for first loads and restarts alike.",
            ["model"], buckets=LOAD_BUCKETS_S, registry=self.registry)
        self.requests = RequestTimes(self.registry)
        if since is not None:
            for event in since.pending():
                self.observe(event)
            since.close()
        self.unsubscribe = registry.events.on_event(self.observe)

    def observe(self, event: ModelEvent) -> None:
        if event.new is WorkerState.READY and event.ready_s is not None:
            self.load_duration.labels(event.model).observe(event.ready_s)
        elif unloaded_for_good(self._collector.registry, event):
            self.load_duration.remove(event.model)
            self.requests.remove(event.model)
            self.key_usage.forget_model(event.model)

    async def handle(self, request: web.Request) -> web.Response:
        own = generate_latest(self.registry)
        workers = await scrape_workers(self._collector.registry.models())
        return web.Response(body=own + workers, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def scrape_workers(models: Iterable[ModelLifecycle],
                         timeout_s: float = WORKER_SCRAPE_TIMEOUT_S) -> bytes:
    """The metrics of every ready worker that serves them (llama-server's `llamacpp:*`),
    read at once, each bounded by `timeout_s`, merged with a `model` label. A slow or
    broken worker is left out of this scrape; it never stalls the node's own metrics."""
    targets = [(m.model_id, w.endpoint) for m in models
               if m.serves_metrics and (w := m.serving_worker) is not None]
    if not targets:
        return b""
    async with ClientSession(timeout=ClientTimeout(total=timeout_s)) as session:

        async def fetch(model_id: str, endpoint: str) -> tuple[str, str] | None:
            try:
                async with session.get(endpoint + "/metrics") as resp:
                    if resp.status != 200:
                        return None
                    return model_id, await resp.text()
            except (ClientError, OSError, asyncio.TimeoutError, UnicodeDecodeError):
                return None

        answers = await asyncio.gather(*(fetch(m, e) for m, e in targets))
    return merge_worker_metrics([a for a in answers if a is not None])


def merge_worker_metrics(answers: Sequence[tuple[str, str]]) -> bytes:
    """Workers' Prometheus texts as one, each sample labelled with its model. Only
    `llamacpp:` families are taken: a worker cannot pass itself off as the node."""
    families: dict[str, Metric] = {}
    for model_id, text in answers:
        try:
            parsed = list(text_string_to_metric_families(text))
        except (ValueError, TypeError, IndexError):
            log.debug("unreadable /metrics from the worker of %s", model_id, exc_info=True)
            continue
        for family in parsed:
            if not family.name.startswith(WORKER_METRIC_PREFIX):
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type)
            merged.samples.extend(
                sample._replace(labels={**sample.labels, "model": model_id})
                for sample in family.samples)
    if not families:
        return b""

    class Merged(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)
