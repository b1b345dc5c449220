"""Prometheus metrics: what the hub's and the agent's metrics share, and their HTTP endpoint.

A hub and several agents may run in one process (tests, `fedplane up`), so nothing here uses
the client library's global registry: each daemon makes its own CollectorRegistry and serves
it on a port of its own.

Two things keep metrics off the hot paths' bill. Values that are state (jobs by state, queue
depth, cluster capacity) are read when Prometheus scrapes, by a `LoopCollector`, not kept up
to date per event. Latencies observed per job are observed a batch at a time by a
`BatchHistogram`, which costs a tenth of the client library's Histogram per value (no lock:
only the event loop writes it, and a scrape reads a copy).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fedplane.runtime import logs
from fedplane.runtime.config import StartupError

log = logs.get("fedplane.metrics")

# Calls that take milliseconds: an etcd transaction, a publish and its ack, a placement cycle,
# a backend call.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A job's waits, from milliseconds on an idle federation to an hour in a full one.
JOB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class BatchHistogram(Collector):
    """A histogram observed many values at a time, with its label values known up front.

    Every series in `series` is exported from the start, at zero, so that a rule or a dashboard
    never finds a metric missing for want of an event yet.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
        labelnames: Sequence[str] = (),
        series: Iterable[Sequence[str]] = ((),),
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.labelnames = list(labelnames)
        # Per label values: the count of each bucket (not cumulative; the last is +Inf), and the sum.
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        for labels in series:
            self._get(tuple(labels))
        registry.register(self)

    def _get(self, labels: tuple[str, ...]) -> tuple[list[int], list[float]]:
        found = self._series.get(labels)
        if found is None:
            if len(labels) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {labels} for {self.labelnames}")
            found = self._series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        return found

    def observe(self, value: float, *labels: str) -> None:
        counts, total = self._get(labels)
        counts[bisect.bisect_left(self.bounds, value)] += 1
        total[0] += value

    def observe_many(self, values: Iterable[float], *labels: str) -> None:
        counts, total = self._get(labels)
        bounds = self.bounds
        added = 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
            added += value
        total[0] += added

    @contextlib.contextmanager
    def time(self, *labels: str) -> Iterator[None]:
        """Observe how long the block took (failures included)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started, *labels)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (counts, total) in list(self._series.items()):
            snapshot = list(counts)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip([*map(str, self.bounds), "+Inf"], snapshot, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, total[0])
        return [family]


class LoopCollector(Collector):
    """Metrics read from a daemon's state when Prometheus scrapes, on the daemon's event loop.

    The scrape runs in the HTTP server's thread; the state it reads (the job table, the cluster
    registry) belongs to the event loop and changes under it, so `read` runs on the loop, as one
    callback between two of the loop's steps, and the scrape waits for its answer.
    """

    def __init__(self, read: Callable[[], Iterable[Metric]], timeout: float = 5.0) -> None:
        self.read = read
        self.timeout = timeout
        # The daemon's loop: the one running when it was made, or set when serving starts.
        self.loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self.loop = asyncio.get_running_loop()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        loop = self.loop
        with contextlib.suppress(RuntimeError):
            if loop is None or asyncio.get_running_loop() is loop:
                return list(self.read())  # on the loop already (a test reading the registry)
        if loop is None or loop.is_closed():
            return []
        answer: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def read() -> None:
            try:
                answer.set_result(list(self.read()))
            except BaseException as exc:
                answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(read)
            return answer.result(self.timeout)
        except concurrent.futures.TimeoutError:
            log.warning("metrics scrape: the event loop did not answer in time", timeout=self.timeout)
        except RuntimeError:
            pass  # the loop closed meanwhile: the daemon is stopping
        except Exception:
            log.exception("metrics scrape failed")
        return []


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of "host:port" ("[::1]:9464" for IPv6; ":9464" for every interface)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"metrics.listen: {listen!r} is not host:port")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port)


@dataclass
class MetricsServer:
    """A registry served over HTTP (any path answers; Prometheus asks for /metrics)."""

    host: str
    port: int
    _httpd: Any

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        # shutdown() waits for the serving thread's next poll (up to half a second): not on the loop.
        await asyncio.to_thread(self._httpd.shutdown)
        self._httpd.server_close()


async def serve(registry: CollectorRegistry, listen: str) -> MetricsServer:
    """Serve `registry` on `listen` from a thread of its own; a taken or bad address is a StartupError."""
    host, port = parse_listen(listen)
    try:
        # In a thread: binding looks the host name up, which may take a while.
        httpd, _ = await asyncio.to_thread(start_http_server, port, host, registry)
    except OSError as exc:
        raise StartupError(f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
    server = MetricsServer(host, int(httpd.server_address[1]), httpd)
    log.info("serving metrics", url=server.url)
    return server


def redelivered(msgs: Iterable[Any]) -> int:
    """How many of these JetStream messages were delivered before (a nak, or an ack lost or late)."""
    count = 0
    for msg in msgs:
        try:
            if msg.metadata.num_delivered > 1:
                count += 1
        except Exception:  # not a JetStream message (a test's fake)
            continue
    return count
