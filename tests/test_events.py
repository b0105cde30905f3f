"""State changes as events: their order, their shape, and subscribers that misbehave."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

import pytest

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.errors import LoadError
from neuronctl.events import EventBus, ModelEvent
from neuronctl.states import WorkerState as S

from .helpers import MakeRegistry

FAKE = ModelSpec("m", harness="fake")


async def test_a_load_and_an_unload_publish_every_transition_in_order(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    with registry.events.subscribe() as events:
        await registry.load(FAKE)
        await registry.unload("m")
        seen = list(events.pending())
    assert [(e.model, e.old, e.new) for e in seen] == [
        ("m", S.PENDING, S.STARTING), ("m", S.STARTING, S.READY),
        ("m", S.READY, S.STOPPING), ("m", S.STOPPING, S.STOPPED),
    ]
    assert seen[2].reason == "unloaded"
    assert seen[1].ready_s is not None and seen[1].ready_s > 0
    assert [e.time for e in seen] == sorted(e.time for e in seen)
    assert seen[1].to_json() == {
        "model": "m", "from": "loading", "to": "loaded", "from_state": "starting",
        "to_state": "ready", "reason": "", "time": seen[1].time,
    }


async def test_a_failed_first_start_is_one_event_with_the_reason(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    with registry.events.subscribe() as events:
        with pytest.raises(LoadError):
            await registry.load(ModelSpec("m", harness="fake", args=("--mode", "crash")))
        failed = await events.wait_for(lambda e: e.new is S.FAILED, 1.0)
    assert failed.old is S.STARTING
    assert "fatal: simulated load failure" in failed.reason


async def test_a_crash_and_its_restart_are_events_a_test_can_wait_on(
    make_registry: MakeRegistry, node_config: NeuronConfig,
) -> None:
    config = dataclasses.replace(node_config, restart_delay_s=0.05)
    registry = make_registry(config)
    model = await registry.load(FAKE)
    assert model.worker is not None and model.worker.pid is not None
    with registry.events.subscribe() as events:
        os.kill(model.worker.pid, signal.SIGKILL)
        backoff = await events.wait_for(lambda e: e.new is S.BACKOFF, 5.0)
        ready = await events.wait_for(lambda e: e.new is S.READY, 10.0)
    assert "was killed by SIGKILL" in backoff.reason
    assert "restart 1 in 0.05 s" in backoff.reason
    assert ready.reason == "restart 1"


async def test_a_subscriber_that_raises_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    got: list[ModelEvent] = []

    def broken(event: ModelEvent) -> None:
        raise RuntimeError("subscriber bug")

    bus.on_event(broken)
    bus.on_event(got.append)
    event = ModelEvent("m", S.PENDING, S.STARTING)
    with caplog.at_level(logging.ERROR, logger="neuronctl.events"):
        bus.publish(event)
    assert got == [event]
    assert any("subscriber bug" in (r.exc_text or "") for r in caplog.records)


async def test_a_slow_subscription_keeps_only_its_backlog_and_counts_the_rest() -> None:
    bus = EventBus()
    sub = bus.subscribe(backlog=3)
    for i in range(5):
        bus.publish(ModelEvent(f"m{i}", S.PENDING, S.STARTING))
    assert sub.dropped == 2
    assert [e.model for e in sub.pending()] == ["m2", "m3", "m4"]
    sub.close()
    bus.publish(ModelEvent("late", S.PENDING, S.STARTING))
    assert list(sub.pending()) == []  # closed: nothing more arrives


async def test_unsubscribing_a_callback_stops_it() -> None:
    bus = EventBus()
    got: list[ModelEvent] = []
    unsubscribe = bus.on_event(got.append)
    bus.publish(ModelEvent("a", S.PENDING, S.STARTING))
    unsubscribe()
    bus.publish(ModelEvent("b", S.PENDING, S.STARTING))
    assert [e.model for e in got] == ["a"]


async def test_wait_for_times_out() -> None:
    with EventBus().subscribe() as sub, pytest.raises(asyncio.TimeoutError):
        await sub.wait_for(lambda e: True, 0.05)
