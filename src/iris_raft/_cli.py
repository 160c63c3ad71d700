"""The ``iris`` command: servers and operator tools.

Exit codes: 0 success, 1 operation failed (e.g. cluster unreachable),
2 bad configuration or usage, 3 corrupt data file (see the message for the
file and what to do), 4 cannot start (port in use, missing file).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from ._config import (
    EXIT_CONFIG,
    ConsistencyMode,
    IrisConfig,
    check_production,
    load_config,
    parse_address,
    secret_file_warnings,
)
from ._exceptions import ConfigError, CorruptFile, IrisError

logger = logging.getLogger("iris")

EXIT_FAILED = 1
EXIT_CORRUPT = 3
EXIT_START = 4


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # PySyncObj is chatty at INFO about connections; keep its warnings.
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)


def _server_ssl(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def _client_ssl(cafile: str | None) -> ssl.SSLContext | None:
    if not cafile:
        return None
    return ssl.create_default_context(cafile=cafile)


def _overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise ConfigError(f"--set expects section.key=value, got {pair!r}", key=pair)
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> IrisConfig:
    overrides = _overrides(getattr(args, "set", None))
    overrides.update(extra or {})
    config = load_config(args.config, overrides=overrides)
    if args.config:
        for warning in secret_file_warnings(args.config):
            logger.warning("%s", warning)
    return config


# ------------------------------------------------------------------ servers


async def _update_metrics(node: Any, port: int) -> None:
    from ._metrics import CoreMetrics

    metrics = CoreMetrics(node)
    bound = metrics.start(port)
    logger.info("metrics and health on http://0.0.0.0:%d/metrics (/health)", bound)
    while True:
        metrics.update()
        await trio.sleep(1.0)


#: Longest the cyclic garbage collector stays paused while a core starts.
STARTUP_GC_PAUSE_LIMIT = 120.0


async def _resume_gc_when_ready(node: Any, limit: float = STARTUP_GC_PAUSE_LIMIT) -> None:
    """Freeze what start-up allocated, then turn the cyclic collector back on.

    Loading a snapshot or replaying the journal allocates millions of
    long-lived, acyclic objects (the replicated state); with the collector on,
    its generational passes over them cost about a third of the load time, and
    the first pass after turning it back on would walk them all (over a second
    per million stored messages, on whichever thread allocates next).
    Freezing moves them to the permanent generation instead; the only cost is
    that cyclic garbage made during start-up is never collected (objects
    without cycles are freed by reference counting as usual).
    """
    with trio.move_on_after(limit):
        await node.wait_ready()
    gc.freeze()
    gc.enable()


async def run_core(
    config: IrisConfig,
    *,
    ready: Callable[[dict[str, Any]], None] | None = None,
    pause_gc_during_startup: bool = False,
) -> None:
    """Run one core node with its RPC server until SIGTERM/SIGINT.

    ``pause_gc_during_startup`` (for a process that runs only this core, as
    ``iris core`` does) turns the cyclic garbage collector off until the node
    has loaded its state and caught up with the leader (at most
    ``STARTUP_GC_PAUSE_LIMIT`` seconds); see :func:`_resume_gc_when_ready`.
    """
    from ._node import open_node
    from ._server import serve_core

    if pause_gc_during_startup:
        gc.disable()
    core = config.core
    host, port = parse_address(core.rpc)
    secret = config.cluster.secret.encode() if config.cluster.secret else None
    ssl_ctx = _server_ssl(core.tls_cert, core.tls_key)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_node(config) as node, trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: serve_core(
                    node, host, port, secret=secret, ssl_context=ssl_ctx, task_status=task_status
                )
            )
            sockname = listeners[0].socket.getsockname()
            info = {
                "node": node.node_id,
                "rpc": f"{sockname[0]}:{sockname[1]}",
                "mode": node.mode.value,
                "data_dir": core.data_dir,
                "pid": os.getpid(),
            }
            if core.metrics_port is not None:
                nursery.start_soon(_update_metrics, node, core.metrics_port)
            if pause_gc_during_startup:
                nursery.start_soon(_resume_gc_when_ready, node)
            print(f"iris core ready {json.dumps(info)}", flush=True)
            if ready is not None:
                ready(info)
            async for signum in signals:
                logger.info("received %s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _cmd_core(args: argparse.Namespace) -> int:
    config = _load(args)
    for warning in check_production(config, "core", dev=False):
        logger.warning("%s", warning)
    trio.run(partial(run_core, config, pause_gc_during_startup=True))
    return 0


# -------------------------------------------------------------------- tools


def _rpc_addresses(args: argparse.Namespace, config: IrisConfig) -> list[str]:
    if getattr(args, "rpc", None):
        return list(args.rpc)
    if getattr(args, "data_dir", None):
        from ._dev import dev_rpc_address

        return [dev_rpc_address(args.data_dir)]
    addresses = list(config.edge.cores)
    if config.core.rpc and config.core.rpc not in addresses:
        addresses.append(config.core.rpc)
    return addresses


def _with_client(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    from ._client import open_client

    if not (args.config or getattr(args, "rpc", None) or getattr(args, "data_dir", None)):
        raise ConfigError("give --config FILE, --rpc ADDRESS or --data-dir DIR", key="--config")
    config = _load(args)
    cores = _rpc_addresses(args, config)

    async def main() -> Any:
        async with open_client(
            cores,
            secret=config.cluster.secret,
            ssl_context=_client_ssl(getattr(args, "cafile", None)),
            timeout=args.timeout,
            prefer_leader=True,
        ) as client:
            return await fn(client)

    return trio.run(main)


def _cmd_status(args: argparse.Namespace) -> int:
    async def fetch(client: Any) -> dict[str, Any]:
        status: dict[str, Any] = await client.status()
        status["connected_to"] = client.connected_to
        return status

    status = _with_client(args, fetch)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return 0
    raft = status.get("raft", {})
    print(f"node            {status['node']} (rpc {status['rpc']})")
    print(f"mode            {status['mode']}")
    print(f"leader          {status['leader'] or '-'}")
    print(
        f"term / commit   {raft.get('term')} / {raft.get('commit_index')} (applied {raft.get('last_applied')})"
    )
    print(f"safe for writes {status['safe_for_writes']} ({status['partition_state']})")
    print(f"WAL backlog     {status['wal_backlog']}")
    print(f"state memory    {status['state_bytes']} of {status['max_state_bytes']} bytes")
    st = status["state"]
    print(f"stored messages {st['messages']} in {st['inboxes']} inboxes; sessions {st['sessions']}")
    print("nodes:")
    for n in status["nodes"]:
        print(
            f"  {n['node']:<22} rpc {n['rpc'] or '?':<22} {'up' if n['reachable'] else 'DOWN':<5} {n['state']}"
        )
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    if bool(args.jti) == bool(args.user):
        print("iris revoke: give exactly one of --jti or --user", file=sys.stderr)
        return EXIT_CONFIG

    async def revoke(client: Any) -> str:
        if args.jti:
            exp_ms = int((args.exp if args.exp is not None else time.time() + 30 * 86400) * 1000)
            await client.revoke_token(args.jti, exp_ms)
            return f"revoked token {args.jti}"
        before = await client.revoke_user(args.user)
        return f"revoked every token of {args.user} issued before {before} ms"

    print(_with_client(args, revoke))
    return 0


def _cmd_join(args: argparse.Namespace) -> int:
    async def join(client: Any) -> str:
        await client.add_node(args.node)
        return f"added {args.node} to the cluster"

    print(_with_client(args, join))
    return 0


def _cmd_leave(args: argparse.Namespace) -> int:
    async def leave(client: Any) -> str:
        await client.remove_node(args.node)
        return f"removed {args.node} from the cluster"

    print(_with_client(args, leave))
    return 0


def _cmd_backup(args: argparse.Namespace) -> int:
    from ._backup import load_backup, write_backup

    async def backup(client: Any) -> bytes:
        conn = await client._connection()
        info = await conn.call("backup_prepare", {}, timeout=max(args.timeout, 60))
        parts: list[bytes] = []
        offset = 0
        while offset < info["size"]:
            chunk = await conn.call("backup_chunk", {"offset": offset}, timeout=args.timeout)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)

    data = _with_client(args, backup)
    header, state = load_backup(data, args.out)
    write_backup(args.out, data)
    print(
        f"backup written to {args.out}: {len(data)} bytes, {state.message_count} messages, "
        f"from {header['node']} ({header['mode']})"
    )
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from ._backup import load_backup, restore_into

    config = _load(args)
    with open(args.source, "rb") as f:
        data = f.read()
    _header, state = load_backup(data, args.source)
    cluster = list(config.cluster.expected_cluster_nodes) or [config.core.node or ""]
    wal_dir = config.core.wal_directory or os.path.join(config.core.data_dir, "wal")
    moved = restore_into(config.core.data_dir, wal_dir, state, cluster)
    for path in moved:
        print(f"moved aside: {path}")
    print(
        f"restored {state.message_count} messages from {args.source} into {config.core.data_dir}; "
        "run this on every core, then start them all"
    )
    return 0


# --------------------------------------------------------------------- main


def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Add ``--config`` and ``--set`` to a subcommand."""
    p.add_argument("--config", required=required, help="TOML configuration file")
    p.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key"
    )


def load_from_args(args: argparse.Namespace) -> IrisConfig:
    """The configuration named by ``--config``/``--set`` (warnings logged)."""
    return _load(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iris", description="Iris messaging backbone")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(_subparsers=sub)

    def with_rpc(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rpc", action="append", help="core RPC address (repeatable)")
        p.add_argument("--data-dir", help="reach the core of an `iris dev` data folder")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        p.add_argument("--cafile", help="CA bundle when the cores use TLS")

    p = sub.add_parser("core", help="run a core node")
    with_config(p)
    p.set_defaults(func=_cmd_core)

    p = sub.add_parser("status", help="show cluster status")
    with_config(p, required=False)
    with_rpc(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("revoke", help="revoke a token (--jti) or every token of a user (--user)")
    with_config(p, required=False)
    with_rpc(p)
    p.add_argument("--jti")
    p.add_argument("--user")
    p.add_argument("--exp", type=float, help="the token's expiry (epoch seconds), for --jti")
    p.set_defaults(func=_cmd_revoke)

    p = sub.add_parser("join", help="add a core (its Raft address) to the running cluster")
    with_config(p)
    with_rpc(p)
    p.add_argument("--node", required=True)
    p.set_defaults(func=_cmd_join)

    p = sub.add_parser("leave", help="remove a core (its Raft address) from the cluster")
    with_config(p)
    with_rpc(p)
    p.add_argument("--node", required=True)
    p.set_defaults(func=_cmd_leave)

    p = sub.add_parser("backup", help="write a consistent backup of the state")
    with_config(p)
    with_rpc(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_backup)

    p = sub.add_parser("restore", help="offline: prepare this core's data folder from a backup")
    with_config(p)
    p.add_argument("--from", dest="source", required=True)
    p.set_defaults(func=_cmd_restore)
    return parser


def _unwrap(exc: BaseException) -> BaseException:
    """The first meaningful error inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        preferred = [
            e for e in exc.exceptions if isinstance(e, IrisError | OSError | BaseExceptionGroup)
        ]
        exc = (preferred or list(exc.exceptions))[0]
    return exc


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the ``iris`` command (``parser``: a parser extended by another package)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        try:
            result: int = args.func(args)
            return result
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    except ConfigError as exc:
        print(f"iris: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except CorruptFile as exc:
        print(f"iris: corrupt data file {exc.path}: {exc.message}", file=sys.stderr)
        return EXIT_CORRUPT
    except IrisError as exc:
        print(f"iris: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"iris: cannot start: {exc}", file=sys.stderr)
        return EXIT_START
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["ConsistencyMode", "main", "run_core"]
