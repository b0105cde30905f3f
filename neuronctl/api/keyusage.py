"""Usage per key since the daemon started: requests by model and status, tokens by model
and kind. Read by `/metrics` (`neuron_key_requests_total`, `neuron_key_tokens_total`) and
`GET /keys/usage`.

Bounded: a key is a configured name, and a model label is one the node knew when the
request was served (the router names it, `MODEL_LABEL`; a request that named no model the
node knows is counted under ""), so clients cannot grow these with made-up names; an
ad-hoc model's counts go when it is unloaded (metrics.py), as its other series do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

KINDS = ("prompt", "completion")


@dataclass
class RequestTokens:
    """One request's tokens, counted by upstream.py as the answer passes."""

    prompt: int = 0
    completion: int = 0


# Set on a request by the auth middleware (its tally) and the router (the model it served).
REQUEST_TOKENS = web.RequestKey("request_tokens", RequestTokens)
MODEL_LABEL = web.RequestKey("model_label", str)


class KeyUsage:
    def __init__(self) -> None:
        self.since = time.time()
        self.requests: dict[tuple[str, str, int], int] = {}  # (key, model, status)
        self.tokens: dict[tuple[str, str, str], int] = {}  # (key, model, kind)

    def record(self, key: str, model: str, status: int, tokens: RequestTokens | None) -> None:
        slot = (key, model, status)
        self.requests[slot] = self.requests.get(slot, 0) + 1
        if tokens is None:
            return
        for kind, count in (("prompt", tokens.prompt), ("completion", tokens.completion)):
            if count:
                self.tokens[(key, model, kind)] = self.tokens.get((key, model, kind), 0) + count

    def forget_model(self, model: str) -> None:
        """An ad-hoc model unloaded for good: its series go, as the node's own do, so
        load/unload churn of made-up ids does not grow them."""
        self.requests = {slot: n for slot, n in self.requests.items() if slot[1] != model}
        self.tokens = {slot: n for slot, n in self.tokens.items() if slot[1] != model}

    def to_json(self) -> dict[str, Any]:
        keys: dict[str, dict[str, Any]] = {}
        for (key, model, status), count in sorted(self.requests.items()):
            entry = keys.setdefault(key, {"requests": {}, "tokens": {}})
            entry["requests"].setdefault(model, {})[str(status)] = count
        for (key, model, kind), count in sorted(self.tokens.items()):
            entry = keys.setdefault(key, {"requests": {}, "tokens": {}})
            entry["tokens"].setdefault(model, dict.fromkeys(KINDS, 0))[kind] = count
        return {"since": self.since, "keys": keys}


class KeyUsageCollector(Collector):
    """The counters for `/metrics`, read at scrape time."""

    def __init__(self, usage: KeyUsage) -> None:
        self.usage = usage

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "neuron_key_requests_total",
            "Model-serving requests per key, by the model served and the answer's status.",
            labels=["key", "model", "code"])
        for (key, model, status), count in sorted(self.usage.requests.items()):
            requests.add_metric([key, model, str(status)], count)
        yield requests
        tokens = CounterMetricFamily(
            "neuron_key_tokens_total", "Tokens per key and model: prompt and completion.",
            labels=["key", "model", "kind"])
        for (key, model, kind), count in sorted(self.usage.tokens.items()):
            tokens.add_metric([key, model, kind], count)
        yield tokens
