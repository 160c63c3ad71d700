"""``iris dev``: a one-process development server with its data in one folder.

Runs a single-node core (no cluster secret: dev mode) with its Raft files and
WAL under ``--data-dir``, so stored messages survive a restart.
"""

from __future__ import annotations

import argparse
import os
import socket

import trio

from ._config import IrisConfig


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def dev_config(data_dir: str, *, raft_port: int | None = None, rpc_port: int | None = None) -> IrisConfig:
    """A single-node configuration that keeps everything under ``data_dir``.

    The Raft and RPC ports are remembered in the folder so a restart reuses them.
    """
    os.makedirs(data_dir, exist_ok=True)
    ports_file = os.path.join(data_dir, "dev-ports")
    if raft_port is None or rpc_port is None:
        try:
            with open(ports_file) as f:
                saved = [int(x) for x in f.read().split()]
            raft_port, rpc_port = raft_port or saved[0], rpc_port or saved[1]
        except (OSError, ValueError, IndexError):
            raft_port = raft_port or _free_port("127.0.0.1")
            rpc_port = rpc_port or _free_port("127.0.0.1")
    with open(ports_file, "w") as f:
        f.write(f"{raft_port} {rpc_port}\n")
    return IrisConfig.for_dev(data_dir, raft_port=raft_port, rpc_port=rpc_port)


def run_dev(args: argparse.Namespace) -> int:
    from ._cli import run_core

    data_dir = os.path.abspath(args.data_dir)
    config = dev_config(data_dir)
    print(f"iris dev: data in {data_dir}", flush=True)
    trio.run(run_core, config)
    return 0
