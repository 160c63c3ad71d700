"""A bare WebSocket echo server: the baseline the edge is compared with.

    python -m benchmarks.echo_server [--host 127.0.0.1] [--port 0] [--impl trio|picows]

``--impl trio`` (the default) is trio-websocket with the settings the edge
passes to ``serve_websocket`` (``message_queue_size=16``, 64 KiB maximum
message, 10 s connect and 5 s disconnect timeouts, a handler nursery, the
``iris.v1`` subprotocol selected when offered): what the edge would do if it
did nothing but echo. Every binary or text message is sent back as is.

``--impl picows`` is a picows (asyncio, Cython) echo server, much faster
than any trio server: it shows the ceiling of the load generator itself.

Prints ``echo ready {"port": P, "pid": PID, "impl": ...}`` once it listens,
then serves until SIGTERM/SIGINT. Raises its soft open-files limit to the
hard one, as the edge does, so it can hold as many connections.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from benchmarks._common import raise_nofile

SUBPROTOCOL = "iris.v1"
#: The edge's ``serve_websocket`` settings (src/iris_edge/_server.py, ``EdgeServer.serve``).
MESSAGE_QUEUE_SIZE = 16
MAX_MESSAGE_SIZE = 65536
CONNECT_TIMEOUT = 10
DISCONNECT_TIMEOUT = 5


def _ready(port: int, impl: str) -> None:
    info = {"port": port, "pid": os.getpid(), "impl": impl, "nofile": raise_nofile()}
    print(f"echo ready {json.dumps(info)}", flush=True)


async def serve_trio(host: str, port: int) -> None:
    import trio
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    async def handler(request: WebSocketRequest) -> None:
        offered = list(request.proposed_subprotocols)
        ws = await request.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        except ConnectionClosed:
            pass

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    handler,
                    host,
                    port,
                    None,
                    handler_nursery=nursery,
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    max_message_size=MAX_MESSAGE_SIZE,
                    connect_timeout=CONNECT_TIMEOUT,
                    disconnect_timeout=DISCONNECT_TIMEOUT,
                    task_status=task_status,
                )
            )
            _ready(int(server.port), "trio-websocket")
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def serve_picows(host: str, port: int) -> None:
    import asyncio

    from picows import (
        WSFrame,
        WSListener,
        WSMsgType,
        WSTransport,
        WSUpgradeRequest,
        WSUpgradeResponse,
        WSUpgradeResponseWithListener,
        ws_create_server,
    )

    class Echo(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            kind = frame.msg_type
            if kind == WSMsgType.BINARY or kind == WSMsgType.TEXT:
                transport.send(kind, frame.get_payload_as_memoryview())
            elif kind == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    def factory(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        response = WSUpgradeResponse.create_101_response()
        if SUBPROTOCOL in [p.strip() for p in offered.split(",")]:
            response.headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        return WSUpgradeResponseWithListener(response, Echo())

    server = await ws_create_server(factory, host, port, max_frame_size=MAX_MESSAGE_SIZE)
    _ready(int(server.sockets[0].getsockname()[1]), "picows")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.echo_server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--impl", choices=["trio", "picows"], default="trio")
    args = p.parse_args(argv)
    raise_nofile()
    if args.impl == "trio":
        import trio

        trio.run(serve_trio, args.host, args.port)
    else:
        import asyncio

        try:
            import uvloop

            uvloop.run(serve_picows(args.host, args.port))
        except ImportError:
            asyncio.run(serve_picows(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
