"""Prometheus metrics of the API process: request latency and counts, and task figures read at scrape time.

Request metrics live in prometheus-client's default registry (one set per process, like the model server's
swap counters); :class:`RequestMetricsMiddleware` labels them with the route *template* (``/tasks/{task_id}``,
not the id) so that the label set stays bounded. Task counts by state and the durations of finished tasks
come from the task table at scrape time (:class:`TaskCollector`), so every API process reports the same
figures whichever process or worker changed them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import FINISHED_STATES, TaskState, TaskStore, TaskView

REQUEST_LATENCY = Histogram(
    "incseg_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0),
)
REQUESTS = Counter(
    "incseg_http_requests_total",
    "Answered requests by method, route template and status code.",
    ["method", "route", "status"],
)
SEGMENT_REJECTED = Counter(
    "incseg_segment_rejected_total",
    "POST /segment requests answered 503 because every work slot and queue place was taken.",
)
SEGMENT_ADMITTED = Gauge(
    "incseg_segment_admitted",
    "POST /segment requests admitted: reading their image, waiting for a work slot, or at work.",
)
SEGMENT_RUNNING = Gauge(
    "incseg_segment_running", "POST /segment requests decoding their image or encoding their answer."
)
SEGMENT_BATCH_SIZE = Histogram(
    "incseg_segment_batch_size",
    "Images per runtime call of POST /segment (requests batched within INCSEG_BATCH_WINDOW_MS).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
SEGMENT_BATCH_WAIT = Histogram(
    "incseg_segment_batch_wait_seconds",
    "Time a POST /segment image waited from its arrival at the batcher to the start of its runtime call: "
    "the batching window, or the wait for a free model run.",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
UNMATCHED_ROUTE = "<unmatched>"
TASK_DURATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
TASK_PAGE = 500


class RequestMetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request (no extra task or body copy per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception escaping the app is answered 500 by the server

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            # the router stores the matched route in the scope; its path is the template
            template = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            REQUEST_LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
            REQUESTS.labels(scope["method"], template, str(status)).inc()


class TaskCollector(Collector):
    """Task counts by state and durations of finished tasks, read from the task table at each scrape."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def _all_tasks(self) -> Iterator[TaskView]:
        offset = 0
        while True:
            tasks, total = self.store.page(offset, TASK_PAGE)
            yield from tasks
            offset += len(tasks)
            if not tasks or offset >= total:
                return

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("incseg_tasks", "Tasks in the task table by state.", labels=["state"])
        for state, count in self.store.counts().items():
            gauge.add_metric([state.value], count)
        yield gauge
        durations: dict[TaskState, list[float]] = {state: [] for state in FINISHED_STATES}
        for task in self._all_tasks():
            if task.state in durations and task.started_at is not None and task.finished_at is not None:
                durations[task.state].append((task.finished_at - task.started_at).total_seconds())
        histogram = HistogramMetricFamily(
            "incseg_task_duration_seconds",
            "Run time (start to finish) of finished tasks by final state.",
            labels=["state"],
        )
        for state, values in durations.items():
            histogram.add_metric([state.value], _cumulative_buckets(values), sum_value=sum(values))
        yield histogram


def _cumulative_buckets(values: list[float]) -> list[tuple[str, float]]:
    """Prometheus histogram buckets (upper bound, count of values <= bound), ``+Inf`` last."""
    bounds = [*TASK_DURATION_BUCKETS, float("inf")]
    return [(_bound_label(bound), sum(value <= bound for value in values)) for bound in bounds]


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def render_metrics(task_registry: CollectorRegistry) -> bytes:
    """The text exposition of the process-wide metrics followed by the task table's."""
    return generate_latest(REGISTRY) + generate_latest(task_registry)


def task_registry(store: TaskStore) -> CollectorRegistry:
    """A registry holding one :class:`TaskCollector` (one per app, so tests may build several apps)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TaskCollector(store))
    return registry
