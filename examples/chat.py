"""A terminal chat over Iris: type ``bob: hello`` to send, incoming messages are printed and acked.

Two users chatting in two terminals through ``iris dev``::

    # terminal 1: a core and an edge in one process, data in ./iris-data
    iris dev --data-dir ./iris-data            # prints ws://127.0.0.1:8085/v1 and a token

    # terminal 2: alice (her token comes from `iris token --data-dir ./iris-data --user alice`)
    python examples/chat.py --data-dir ./iris-data --user alice

    # terminal 3: bob
    python examples/chat.py --data-dir ./iris-data --user bob

In alice's terminal type ``bob: hello``; bob's terminal prints
``[12:34:56] alice: hello``. Messages to a user who is offline are stored and
printed when they connect. ``/ping`` shows the round trip time, ``/quit`` (or
Ctrl-D) leaves.

With a token from elsewhere (``examples/local_cluster.py`` prints some)::

    python examples/chat.py --url ws://127.0.0.1:8085/v1 --token TOKEN
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

import trio

from iris_edge._client import AuthError, IrisClient, IrisClientError, open_iris


def parse_line(line: str) -> tuple[str, str] | None:
    """``"bob: hello"`` → ``("bob", "hello")``; None when the line is not ``user: text``."""
    user, sep, text = line.partition(":")
    user, text = user.strip(), text.strip()
    if not sep or not user or not text or " " in user:
        return None
    return user, text


def format_message(sender: str, body: Any, ts_ms: int) -> str:
    """``[HH:MM:SS] sender: body`` in local time."""
    stamp = time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))
    text = body if isinstance(body, str) else repr(body)
    return f"[{stamp}] {sender}: {text}"


async def token_from_data_dir(data_dir: str, user: str) -> str:
    """A token for ``user`` from an ``iris dev`` data folder (``iris token --data-dir``)."""
    result = await trio.run_process(
        [sys.executable, "-m", "iris_edge", "token", "--data-dir", data_dir, "--user", user],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"chat: cannot get a token: {result.stderr.decode().strip()}")
    return result.stdout.decode().strip()


async def print_incoming(client: IrisClient) -> None:
    async for msg in client.messages():
        print(format_message(msg.sender, msg.body, msg.ts), flush=True)
        await client.ack(msg.mid)


async def read_line() -> str:
    """One line of stdin, read in a thread so trio keeps running (cancellable: the thread is
    abandoned, which ``trio.wrap_file`` would not do)."""
    return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def read_input(client: IrisClient) -> None:
    while True:
        line = await read_line()
        if not line or line.strip() == "/quit":
            return
        line = line.strip()
        if not line:
            continue
        if line == "/ping":
            print(f"round trip {await client.ping() * 1000:.1f} ms", flush=True)
            continue
        parsed = parse_line(line)
        if parsed is None:
            print("type  user: text  to send, /ping, or /quit", flush=True)
            continue
        to, text = parsed
        try:
            await client.send(to, text)
        except AuthError:
            raise
        except IrisClientError as exc:
            print(f"! not sent to {to}: {exc}", flush=True)


async def _until(scope: trio.CancelScope, work: Any, *args: Any) -> None:
    """Run ``work(*args)``; when it returns or the client ends, stop everything in ``scope``."""
    try:
        await work(*args)
    except AuthError as exc:
        print(f"chat: the server closed the connection: {exc.code} (close {exc.close_code})")
    finally:
        scope.cancel()


async def _on_interrupt(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def chat(url: str, token: str) -> None:
    async with open_iris(url, token) as client:
        print(f"connected to {client.edge} as {client.user}; type  user: text  (/quit to leave)")
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(_on_interrupt, scope)
            nursery.start_soon(_until, scope, print_incoming, client)
            nursery.start_soon(_until, scope, read_input, client)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Terminal chat over Iris")
    parser.add_argument("--url", default="ws://127.0.0.1:8085/v1", help="edge URL")
    parser.add_argument("--token", help="a JWT for your user")
    parser.add_argument("--data-dir", help="an iris dev data folder to get a token from")
    parser.add_argument("--user", help="your user (with --data-dir)")
    args = parser.parse_args(argv)
    if args.token:
        token = args.token
    elif args.data_dir and args.user:
        token = trio.run(token_from_data_dir, args.data_dir, args.user)
    else:
        parser.error("give --token, or --data-dir and --user")
    try:
        trio.run(chat, args.url, token)
    except AuthError as exc:
        print(f"chat: the server refused the token ({exc.code}, close {exc.close_code})")
        return 1
    except IrisClientError as exc:
        print(f"chat: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
