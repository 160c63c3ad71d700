"""The single-node configuration behind ``iris dev`` and the embedded examples.

Everything lives under one data folder (Raft files, WAL, the chosen ports), so
a restart finds its data and its ports again. No cluster secret: dev mode.
"""

from __future__ import annotations

import os
import socket

from ._config import IrisConfig


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def dev_config(
    data_dir: str, *, raft_port: int | None = None, rpc_port: int | None = None
) -> IrisConfig:
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


def dev_rpc_address(data_dir: str) -> str:
    """The core RPC address of the ``iris dev`` instance using ``data_dir``."""
    from ._exceptions import ConfigError

    try:
        with open(os.path.join(data_dir, "dev-ports")) as f:
            _raft, rpc = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{data_dir} is not an iris dev data folder ({exc})", key="--data-dir"
        ) from None
    return f"127.0.0.1:{rpc}"
