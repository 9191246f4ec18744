"""Prometheus metrics for ``/metrics``: connections, messages, functions, broker, transport.

Counted where things happen (realtime, pipeline); the broker's and the transport's own
counters are read when scraped (:func:`watch`). Exposed by http.py. Labels stay
low-cardinality: app and function names, never channels or users.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from echo.broker.base import Broker
    from echo.transport.base import Transport


class PlainCounter:
    """A counter with one label, kept as plain integers and exported when scraped.

    prometheus_client's ``Counter`` takes a lock on every increment (2-2.5% of a publish in
    py-spy); these counters change only on the event loop's thread, so a dict will do.
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.counts: dict[str, int] = {}
        REGISTRY.register(self)

    def inc(self, label_value: str, amount: int = 1) -> None:
        counts = self.counts
        counts[label_value] = counts.get(label_value, 0) + amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, count in list(self.counts.items()):
            family.add_metric([label_value], count)
        yield family


CONNECTIONS = Gauge("echo_connections", "Open client connections on this node", ["app"])
MESSAGES_PUBLISHED = PlainCounter(
    "echo_messages_published", "Publish requests accepted", "app"
)
MESSAGES_DELIVERED = PlainCounter(
    "echo_messages_delivered", "Messages emitted to a channel's subscribers", "app"
)
MESSAGES_REJECTED = Counter(
    "echo_messages_rejected_total", "Requests refused, by error code", ["code"]
)
FUNCTION_DURATION = Histogram(
    "echo_function_duration_seconds",
    "Echo function invocation time, including the runner round-trip",
    ["function"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FUNCTION_ERRORS = Counter(
    "echo_function_errors_total", "Echo function failures, by kind", ["function", "kind"]
)
CHAIN_CALLS = Counter(
    "echo_function_chain_calls_total",
    "Chains of two or more functions run in one runner call (one worker round trip)",
)
ASSOCIATIONS_VERSION = Gauge("echo_associations_version", "Version of the associations in force")
RATE_LIMITED = Counter("echo_publish_rate_limited_total", "Publishes refused by the rate limit")
HISTORY_APPENDED = PlainCounter(
    "echo_history_appended", "Messages kept in a history channel's stream", "app"
)
RECOVERIES = Counter(
    "echo_recoveries_total",
    "Subscriptions that asked to recover from a position, by result (recovered or not)",
    ["result"],
)
WEBHOOK_EVENTS = Counter("echo_webhook_events_total", "Events queued for webhooks")
WEBHOOK_DELIVERIES = Counter("echo_webhook_deliveries_total",
                             "Webhook requests a receiver accepted (2xx)")
WEBHOOK_FAILURES = Counter(
    "echo_webhook_failures_total",
    "Webhook failures: retried (a request failed), dropped (out of attempts), not_queued",
    ["kind"],
)
RECOVERED_MESSAGES = Counter(
    "echo_recovered_messages_total", "Missed messages delivered by recoveries"
)
EPOCHS_STARTED = Counter(
    "echo_history_epochs_total",
    "History streams that started a new epoch (new, or their data was lost)",
)
DUPLICATES_SUPPRESSED = Counter(
    "echo_idempotent_duplicates_total",
    "Publishes answered with an earlier publish's ack (same idempotencyKey), not delivered",
)


class _NodeCollector:
    """The broker's and the transport's counters, read at scrape time (they count on the
    hot path as plain integers)."""

    def __init__(self) -> None:
        self.transport: Transport | None = None
        self.broker: Broker | None = None
        REGISTRY.register(self)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.broker is not None:
            stats = self.broker.stats
            for name, value, documentation in (
                ("echo_redis_reconnects", stats.reconnects,
                 "Re-subscriptions to the broker's backend after a loss"),
                ("echo_redis_publish_failures", stats.publish_failures,
                 "Frames not sent to other nodes (backend down, outbox full)"),
                ("echo_broker_lost_deliveries", stats.lost_receivers,
                 "Deliveries to nodes serving a channel that the backend did not reach"),
                ("echo_broker_published", stats.published, "Frames sent to other nodes"),
                ("echo_broker_received", stats.received, "Frames received from other nodes"),
            ):
                yield CounterMetricFamily(name, documentation, value=value)
            for key, value in list(stats.extra.items()):  # the backend's own counters
                yield CounterMetricFamily(f"echo_broker_{key}", f"Broker counter {key}",
                                          value=value)
            entries = self.broker.history_entries()
            if entries is not None:  # kept in this process (memory broker): known here
                yield GaugeMetricFamily("echo_history_entries",
                                        "Messages kept in history streams on this node",
                                        value=entries)
        if self.transport is not None:
            yield CounterMetricFamily(
                "echo_slow_consumers_disconnected",
                "Clients cut off for not reading their messages",
                value=self.transport.slow_consumers,
            )


_NODE = _NodeCollector()


def watch(transport: Transport, broker: Broker) -> None:
    """Export this node's transport and broker counters (the latest server built wins)."""
    _NODE.transport = transport
    _NODE.broker = broker


@functools.cache
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once: ``labels`` takes a lock and builds a key
    on every call, which the per-message paths cannot afford. Label values are few (apps,
    functions, paths), so the cache stays small."""
    return metric.labels(*values)
