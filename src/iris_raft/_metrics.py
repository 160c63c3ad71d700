"""Prometheus metrics and a health endpoint for a core node.

Theory of operation
-------------------
A trio task calls :meth:`CoreMetrics.update` once a second; it copies the
node's status into gauges and into a health snapshot. The HTTP server
(prometheus-client's WSGI app on a daemon thread) only reads those copies,
so scrapes never touch the node's state from another thread.

``/metrics`` serves the Prometheus text format; ``/health`` serves JSON with
``safe_for_writes``, the leader and the Raft state, and answers 503 while
the partition guard blocks writes (so load balancers and alerts can use it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

_RAFT_STATES = {"follower": 0, "candidate": 1, "leader": 2}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_metrics(
    registry: CollectorRegistry, port: int, health: Callable[[], tuple[int, dict[str, Any]]]
) -> int:
    """Serve ``/metrics`` and ``/health`` on ``port`` (0 = any) in a daemon thread; return the port."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/health":
            code, body = health()
            data = json.dumps(body).encode()
            status = "200 OK" if code == 200 else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [data]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    server = make_server("0.0.0.0", port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="iris-metrics", daemon=True)
    thread.start()
    return int(server.server_address[1])


class CoreMetrics:
    """Gauges for one node, refreshed from ``node.status()``."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        r = self.registry
        self.safe = Gauge(
            "iris_core_safe_for_writes", "1 when the partition guard allows writes", registry=r
        )
        self.raft_state = Gauge(
            "iris_core_raft_state", "0 follower, 1 candidate, 2 leader", registry=r
        )
        self.term = Gauge("iris_core_raft_term", "current Raft term", registry=r)
        self.commit = Gauge("iris_core_raft_commit_index", "Raft commit index", registry=r)
        self.applied = Gauge("iris_core_raft_last_applied", "last applied Raft index", registry=r)
        self.peers = Gauge(
            "iris_core_reachable_nodes", "cluster nodes reachable (self included)", registry=r
        )
        self.expected = Gauge("iris_core_cluster_nodes", "cluster members", registry=r)
        self.wal_backlog = Gauge("iris_core_wal_backlog", "WAL records not yet in Raft", registry=r)
        self.queue = Gauge(
            "iris_core_batcher_queue", "operations waiting for a replicated call", registry=r
        )
        self.state_bytes = Gauge(
            "iris_core_state_bytes", "estimated replicated state size", registry=r
        )
        self.max_state = Gauge(
            "iris_core_max_state_bytes", "configured max_state_bytes", registry=r
        )
        self.messages = Gauge("iris_core_stored_messages", "stored messages", registry=r)
        self.sessions = Gauge("iris_core_sessions", "registered sessions", registry=r)
        self.subscriptions = Gauge("iris_core_subscriptions", "live edge subscriptions", registry=r)
        self.batches = Counter("iris_core_batches", "replicated batches committed", registry=r)
        self.ops = Counter("iris_core_operations", "operations committed", registry=r)
        self._last_batches = 0
        self._last_ops = 0
        self._health: tuple[int, dict[str, Any]] = (503, {"status": "starting"})
        self._lock = threading.Lock()

    def start(self, port: int) -> int:
        return serve_metrics(self.registry, port, self.health)

    def health(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return self._health

    def update(self) -> None:
        st = self.node.status()
        raft = st.get("raft", {})
        self.safe.set(1 if st["safe_for_writes"] else 0)
        self.raft_state.set(_RAFT_STATES.get(raft.get("state", ""), -1))
        self.term.set(raft.get("term") or 0)
        self.commit.set(raft.get("commit_index") or 0)
        self.applied.set(raft.get("last_applied") or 0)
        self.peers.set(sum(1 for n in st["nodes"] if n["reachable"]))
        self.expected.set(len(st["nodes"]))
        self.wal_backlog.set(st["wal_backlog"])
        self.queue.set(st["batcher"]["queued"])
        self.state_bytes.set(st["state_bytes"])
        self.max_state.set(st["max_state_bytes"])
        self.messages.set(st["state"]["messages"])
        self.sessions.set(st["state"]["sessions"])
        self.subscriptions.set(st["subscriptions"])
        b, o = st["batcher"]["batches"], st["batcher"]["ops"]
        self.batches.inc(max(0, b - self._last_batches))
        self.ops.inc(max(0, o - self._last_ops))
        self._last_batches, self._last_ops = b, o
        body = {
            "status": "ok" if st["safe_for_writes"] else "writes_blocked",
            "node": st["node"],
            "mode": st["mode"],
            "leader": st["leader"],
            "safe_for_writes": st["safe_for_writes"],
            "raft_state": raft.get("state"),
            "wal_backlog": st["wal_backlog"],
        }
        with self._lock:
            self._health = (200 if st["safe_for_writes"] else 503, body)
