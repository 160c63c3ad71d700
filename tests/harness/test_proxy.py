"""The per-link proxy: pass, blackhole, reset, delay — against a real echo server."""

from __future__ import annotations

import trio
from jepsen_like.proxy import LinkMode, LinkProxy


async def _echo_server(task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
    async def echo(stream: trio.SocketStream) -> None:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


async def test_modes() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_echo_server)
            proxy = LinkProxy("a->b", ("127.0.0.1", port))
            pport = await nursery.start(proxy.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", pport)
            await stream.send_all(b"ping")
            assert await stream.receive_some(10) == b"ping"

            proxy.set_mode(LinkMode.BLACKHOLE)
            await stream.send_all(b"lost?")
            with trio.move_on_after(0.3) as scope:
                await stream.receive_some(10)
            assert scope.cancelled_caught  # nothing came back while blackholed

            proxy.set_mode(LinkMode.PASS, delay=0.2)
            start = trio.current_time()
            data = b""
            while len(data) < len(b"lost?"):
                data += await stream.receive_some(10)
            assert data == b"lost?"  # held bytes flow once healed, after the delay
            assert trio.current_time() - start >= 0.19

            proxy.set_mode(LinkMode.RESET)
            assert await stream.receive_some(10) == b""  # connection closed
            other = await trio.open_tcp_stream("127.0.0.1", pport)
            assert await other.receive_some(10) == b""  # new ones refused
            await other.aclose()
            await stream.aclose()
            nursery.cancel_scope.cancel()
