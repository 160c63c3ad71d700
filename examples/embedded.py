"""Embed iris_raft in your own trio program: a replicated inbox store, no servers.

Run:  python examples/embedded.py [--nodes 3] [--data-dir ./embedded-data]

With one node it is a durable local store; with three it starts a local Raft
group in this process (three PySyncObj nodes on 127.0.0.1) and shows that a
message stored through one node is read through another.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket

import trio

import iris_raft
from iris_raft import ConsistencyMode, IrisConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_configs(data_dir: str, nodes: int) -> list[IrisConfig]:
    """One configuration per node of a local cp group (dev mode: no secret)."""
    raft = [f"127.0.0.1:{free_port()}" for _ in range(nodes)]
    configs = []
    for i, node in enumerate(raft):
        base = IrisConfig.for_dev(
            os.path.join(data_dir, f"node-{i}"),
            raft_port=int(node.split(":")[1]),
            rpc_port=free_port(),
        )
        cluster = dataclasses.replace(
            base.cluster,
            expected_cluster_nodes=tuple(raft),
            replication_factor=nodes,
            consistency_mode=ConsistencyMode.CP,
        )
        configs.append(dataclasses.replace(base, cluster=cluster))
    return configs


async def main(nodes: int, data_dir: str) -> None:
    configs = group_configs(data_dir, nodes)
    async with contextlib.AsyncExitStack() as stack:
        group = [await stack.enter_async_context(iris_raft.open_node(c)) for c in configs]
        with trio.fail_after(20):
            while not all(n.is_safe_for_writes() for n in group):
                await trio.sleep(0.05)
        first, last = group[0], group[-1]

        sent = await first.send("alice", "hello-1", "bob", b"hello, bob")
        print(f"stored {sent.mid} at {sent.ts} (duplicate={sent.duplicate})")
        again = await first.send("alice", "hello-1", "bob", b"hello, bob")
        print(f"retried with the same id: same mid? {again.mid == sent.mid}")

        # In cp mode this read goes through the log: it sees every acknowledged write.
        inbox = await last.fetch_inbox("bob")
        print(f"bob's inbox read through {last.node_id}: {[m.body for m in inbox]}")

        await last.ack("bob", [m.mid for m in inbox])
        print(f"after ack: {len(await first.fetch_inbox('bob'))} stored")

        await first.put("config/motd", "welcome")
        print(f"cas motd welcome->hi: {await last.cas('config/motd', 'welcome', 'hi')}")
        print(f"status: leader {first.status()['leader']}, safe {first.is_safe_for_writes()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--data-dir", default="./embedded-data")
    args = parser.parse_args()
    trio.run(main, args.nodes, args.data_dir)
