"""CutLink: a loopback link that cuts every connection through it and refuses new ones until restored."""

from __future__ import annotations

import asyncio

import pytest

from fedplane.local.link import CutLink

pytestmark = pytest.mark.timeout(20)


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.readexactly(len(payload)), 2)
    writer.close()
    return data


async def test_a_cut_link_closes_its_connections_and_refuses_new_ones_until_restored() -> None:
    server = await echo_server()
    target = server.sockets[0].getsockname()[1]
    async with CutLink("127.0.0.1", target) as link:
        assert await roundtrip(link.port, b"hello") == b"hello"
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 2) == b"before"

        await link.cut()
        assert not link.is_up
        try:  # the open connection is gone: closed, or reset
            assert await asyncio.wait_for(reader.read(1024), 2) == b""
        except ConnectionResetError:
            pass
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", link.port)

        await link.restore()  # on the same port
        assert link.is_up
        assert await roundtrip(link.port, b"again") == b"again"
        assert link.accepted == 3
        writer.close()
    server.close()
    await server.wait_closed()
