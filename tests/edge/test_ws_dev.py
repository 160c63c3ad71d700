"""``iris dev`` (core and edge in one process) keeps stored messages across a restart.

Started as an operator would: ``python -m iris_edge dev --data-dir D --port P``,
waiting for its ``connect to`` and token lines; tokens for other users come
from ``python -m iris_edge token --data-dir D --user U``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from edge_helpers import IRIS, login, start_dev, stop_process, unique
from jepsen_like.cluster import allocate_ports

pytestmark = pytest.mark.cluster


async def test_dev_restart_keeps_stored_messages(tmp_path: Path) -> None:
    data_dir = tmp_path / "iris-data"
    (port,) = allocate_ports(1)
    log = tmp_path / "dev.log"
    reader = unique("reader")
    with trio.fail_after(90):
        proc, url, dev_token = await trio.to_thread.run_sync(start_dev, data_dir, port, log)
        try:
            assert url == f"ws://127.0.0.1:{port}/v1"
            issued = await trio.run_process(
                [*IRIS, "token", "--data-dir", str(data_dir), "--user", reader],
                capture_stdout=True,
                capture_stderr=True,
            )
            reader_token = issued.stdout.decode().strip()
            async with login(url, dev_token) as sender:
                assert sender.welcome is not None and sender.welcome["user"] == "dev-user"
                sent = await sender.send_message(reader, {"kept": True})
        finally:
            status = await trio.to_thread.run_sync(stop_process, proc, signal.SIGTERM)
        assert status == 0, f"iris dev exited with {status} on SIGTERM:\n{log.read_text()}"

        proc, url_again, _ = await trio.to_thread.run_sync(start_dev, data_dir, port, log)
        try:
            assert url_again == url
            async with login(url, reader_token) as receiver:
                (msg,) = await receiver.messages(1)
                assert msg["mid"] == sent["mid"]
                assert msg["from"] == "dev-user" and msg["body"] == {"kept": True}
                assert msg["ts"] == sent["ts"]
        finally:
            await trio.to_thread.run_sync(stop_process, proc, signal.SIGTERM)
