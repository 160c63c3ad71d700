"""The full ``iris`` command: the core commands plus ``edge``, ``dev`` and ``token``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import trio

from iris_raft import ConfigError
from iris_raft._cli import build_parser as build_core_parser
from iris_raft._cli import load_from_args, with_config
from iris_raft._cli import main as core_main


def _cmd_edge(args: argparse.Namespace) -> int:
    from ._app import run_edge

    config = load_from_args(args)
    trio.run(run_edge, config)
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    from iris_raft._dev import dev_config

    from ._app import run_dev

    data_dir = os.path.abspath(args.data_dir)
    config = dev_config(data_dir)
    edge = dataclasses.replace(config.edge, host=args.host, port=args.port)
    config = dataclasses.replace(config, edge=edge)
    trio.run(run_dev, config, data_dir)
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from ._app import resolve_jwt_secret
    from ._auth import issue_token

    if args.data_dir:
        path = os.path.join(args.data_dir, "jwt-secret")
        try:
            with open(path) as f:
                secret: str | None = f.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read {path}: {exc} (run iris dev first)", key="--data-dir"
            ) from None
    elif args.config:
        secret = resolve_jwt_secret(load_from_args(args))
    else:
        raise ConfigError(
            "give --config FILE (with edge.jwt_secret) or --data-dir DIR (iris dev)", key="--config"
        )
    if not secret:
        raise ConfigError("no edge.jwt_secret configured", key="edge.jwt_secret")
    print(issue_token(secret, args.user, ttl=args.ttl, jti=args.jti))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = build_core_parser()
    sub = parser.get_default("_subparsers")

    p = sub.add_parser("edge", help="run an edge (WebSocket server)")
    with_config(p)
    p.set_defaults(func=_cmd_edge)

    p = sub.add_parser("dev", help="run a core and an edge in one process (development)")
    p.add_argument(
        "--data-dir", default="./iris-data", help="where data is kept (default ./iris-data)"
    )
    p.add_argument("--port", type=int, default=8085, help="WebSocket port (default 8085)")
    p.add_argument("--host", default="127.0.0.1", help="WebSocket host (default 127.0.0.1)")
    p.set_defaults(func=_cmd_dev)

    p = sub.add_parser("token", help="issue a JWT for a user")
    with_config(p, required=False)
    p.add_argument("--data-dir", help="use the secret of an iris dev data folder")
    p.add_argument("--user", required=True)
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    p.add_argument("--jti", help="token id (default: random)")
    p.set_defaults(func=_cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return core_main(argv, build_parser())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
