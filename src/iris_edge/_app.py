"""Running an edge: ``iris edge`` (against a core cluster) and ``iris dev`` (all in one).

Theory of operation
-------------------
:func:`run_edge` builds the edge's settings (auto-tune, JWT secret, edge id),
connects a pool of core clients, serves WebSocket (ws, or wss with
``tls_cert``/``tls_key``) and, when ``metrics_port`` is set, Prometheus
metrics and ``/health``. On SIGTERM or SIGINT it drains: no new connections,
queued sends finish, acks are flushed, every connection is closed with 1001.

:func:`run_dev` runs a single-node core (``iris_raft.open_node``) and an
edge in one process, everything under ``--data-dir``: Raft files, WAL, the
generated JWT secret (``jwt-secret``, mode 600) and the ports, so a restart
keeps stored messages and tokens stay valid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from iris_raft import IrisConfig, open_client, open_node
from iris_raft._config import check_production
from iris_raft._metrics import serve_metrics

from ._auth import issue_token
from ._core import CoreAccess, LocalCore, RemoteCore
from ._metrics import EdgeMetrics
from ._server import EdgeServer, EdgeSettings
from ._tune import Tuning, auto_tune

logger = logging.getLogger("iris_edge")


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def resolve_jwt_secret(config: IrisConfig, *, data_dir: str | None = None) -> str | None:
    """The JWT secret in force: configured, stored in the dev data folder, or random (dev only)."""
    edge = config.edge
    if edge.jwt_secret:
        return edge.jwt_secret
    if not edge.auth_enabled:
        return None
    if data_dir is not None:
        path = os.path.join(data_dir, "jwt-secret")
        try:
            with open(path) as f:
                stored = f.read().strip()
            if len(stored.encode()) >= 32:
                return stored
        except FileNotFoundError:
            pass
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return secret
    if edge.allow_random_secret:
        logger.warning(
            "!!! DEV ONLY !!! edge.allow_random_secret: using a random JWT secret. Tokens will "
            "not work on any other edge or after a restart. NEVER use this in production."
        )
        return secrets.token_urlsafe(48)
    return None


@contextlib.asynccontextmanager
async def open_remote_core(config: IrisConfig, pool: int) -> AsyncIterator[RemoteCore]:
    """A pool of core clients for the edge."""
    secret = config.cluster.secret
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                open_client(
                    config.edge.cores, secret=secret, timeout=config.cluster.request_timeout
                )
            )
            for _ in range(pool)
        ]
        yield RemoteCore(clients)


async def serve_edge(
    core: CoreAccess,
    config: IrisConfig,
    *,
    jwt_secret: str | None,
    ready: Callable[[dict[str, Any]], None] | None = None,
    edge_id: str | None = None,
    tuning: Tuning | None = None,
) -> None:
    """Serve the edge until SIGTERM/SIGINT, then drain."""
    edge = config.edge
    tuning = tuning or auto_tune(edge.max_connections, edge.router_pool_size)
    metrics = EdgeMetrics()
    metrics.target_capacity.set(tuning.max_connections)
    settings = EdgeSettings(
        config=edge,
        edge_id=edge_id or f"{socket.gethostname()}:{edge.port}:{secrets.token_hex(3)}",
        max_connections=tuning.max_connections,
        jwt_secret=jwt_secret,
    )
    server = EdgeServer(core, settings, metrics)
    ssl_ctx = server_ssl_context(edge.tls_cert, edge.tls_key)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, edge.host, edge.port, ssl_ctx)
            info: dict[str, Any] = {
                "edge": settings.edge_id,
                "url": f"{'wss' if ssl_ctx else 'ws'}://{_display_host(edge.host)}:{port}/v1",
                "port": port,
                "pid": os.getpid(),
            }
            if edge.metrics_port is not None:
                info["metrics_port"] = serve_metrics(
                    metrics.registry, edge.metrics_port, server.health
                )
            print(f"iris edge ready {json.dumps(info)}", flush=True)
            if ready is not None:
                ready(info)
            async for signum in signals:
                logger.info("received %s: draining", signal.Signals(signum).name)
                await server.drain()
                nursery.cancel_scope.cancel()
                break


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


async def run_edge(config: IrisConfig) -> None:
    """``iris edge``: serve WebSocket clients against the configured core cluster."""
    for warning in check_production(config, "edge"):
        logger.warning("%s", warning)
    secret = resolve_jwt_secret(config)
    if config.edge.auth_enabled and secret is None:
        from iris_raft import ConfigError

        raise ConfigError(
            "edge.jwt_secret is required (>= 32 bytes, identical on every edge); "
            "allow_random_secret = true is for development only",
            key="edge.jwt_secret",
        )
    tuning = auto_tune(config.edge.max_connections, config.edge.router_pool_size)
    async with open_remote_core(config, tuning.router_pool_size) as core:
        await serve_edge(core, config, jwt_secret=secret, tuning=tuning)


async def run_dev(config: IrisConfig, data_dir: str, *, token_user: str = "dev-user") -> None:
    """``iris dev``: a core and an edge in this process, data under ``data_dir``."""
    secret = resolve_jwt_secret(config, data_dir=data_dir)
    async with open_node(config) as node:
        with trio.fail_after(30):
            await node.wait_ready()

        def ready(info: dict[str, Any]) -> None:
            lines = [f"iris dev: data in {data_dir}", f"iris dev: connect to {info['url']}"]
            if secret is not None:
                token = issue_token(secret, token_user, ttl=24 * 3600)
                lines.append(f"iris dev: a token for user {token_user!r} (24 h): {token}")
                lines.append(f"iris dev: more tokens: iris token --data-dir {data_dir} --user NAME")
                lines.append(f"iris dev: status and revocation: iris status --data-dir {data_dir}")
            for line in lines:
                print(line, flush=True)

        # The core's RPC port too, so `iris status/revoke --data-dir DIR` work against dev.
        from iris_raft import serve_core
        from iris_raft._config import parse_address

        host, port = parse_address(config.core.rpc)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_core(
                    node, host, port, secret=None, task_status=task_status
                )
            )
            await serve_edge(
                LocalCore(node), config, jwt_secret=secret, ready=ready, edge_id="dev-edge"
            )
            nursery.cancel_scope.cancel()
