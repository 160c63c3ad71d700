"""Prometheus metrics of an edge (served with its health on ``[edge] metrics_port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EdgeMetrics:
    """The figures the guide monitors, for one edge."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.connections = Gauge("iris_edge_connections", "authenticated connections", registry=r)
        self.handshakes = Counter(
            "iris_edge_handshakes", "WebSocket handshakes accepted", registry=r
        )
        self.rejected = Counter("iris_edge_rejected", "handshakes refused", ["reason"], registry=r)
        self.frames_in = Counter(
            "iris_edge_frames_in", "frames received by type", ["type"], registry=r
        )
        self.frames_out = Counter(
            "iris_edge_frames_out", "frames sent by type", ["type"], registry=r
        )
        self.errors = Counter("iris_edge_errors", "error frames sent by code", ["code"], registry=r)
        self.closes = Counter(
            "iris_edge_closes", "connections closed by the edge", ["reason"], registry=r
        )
        self.auth_failures = Counter(
            "iris_edge_auth_failures", "failed authentications", ["code"], registry=r
        )
        self.send_latency = Histogram(
            "iris_edge_send_latency_seconds",
            "send frame to sent frame",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "iris_edge_delivery_latency_seconds",
            "message acceptance (ts) to msg frame queued",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queued = Gauge(
            "iris_edge_queued_frames", "frames waiting in connection queues", registry=r
        )
        self.core_reachable = Gauge("iris_edge_core_reachable", "1 when a core answers", registry=r)
        self.core_safe = Gauge(
            "iris_edge_core_safe_for_writes",
            "1 when the core's partition guard allows writes",
            registry=r,
        )
        self.target_capacity = Gauge(
            "iris_edge_target_capacity", "auto-tuned connection capacity", registry=r
        )
