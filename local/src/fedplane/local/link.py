"""A network link that tests and the chaos harness can cut and restore, without root.

`CutLink` is a loopback TCP proxy: point a client (an edge site's leaf nats-server, an agent)
at `CutLink.address` instead of the server it forwards to. `cut()` closes every connection
through it and stops accepting, so the client sees its peer go away and its reconnects
refused, as when a site's uplink drops; `restore()` accepts again. Nothing is buffered
across a cut: what was in flight is lost, as on a real link.
"""

from __future__ import annotations

import asyncio
import contextlib

from fedplane.local.servers import free_port

_CHUNK = 64 * 1024


class CutLink:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port` until cut."""

    def __init__(self, target_host: str, target_port: int, port: int = 0, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        # Fixed at construction, so that clients keep one address across cuts and restores.
        self.port = port or free_port(host)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        # Connections accepted since construction: a test can tell that a client came back.
        self.accepted = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    async def start(self) -> CutLink:
        """Accept connections (the link is up)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        return self

    async def cut(self) -> None:
        """Stop accepting and close every connection through the link, at once and both ways."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        await self.start()

    async def close(self) -> None:
        await self.cut()

    async def __aenter__(self) -> CutLink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted just as the link was cut
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        if self._server is None:
            _abort(writer)
            _abort(up_writer)
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, (writer, up_writer)))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        """Copy one direction; when either side ends, end the whole connection."""
        try:
            while data := await source.read(_CHUNK):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in both:
                self._writers.discard(writer)
                _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once, discarding what is buffered (a cut link delivers nothing more)."""
    writer.transport.abort()
