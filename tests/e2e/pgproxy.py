"""A TCP proxy in front of the test PostgreSQL that a test can make unreachable:
"refuse" closes every connection at once (database down), "blackhole" keeps
connections open but holds every byte until the mode changes (database hangs,
like a stalled network: nothing is lost, TCP would retransmit it). ``cut`` drops
every open connection in the middle of the server's next reply (half of it is
delivered): a connection lost mid-statement, while new connections still work."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole"]


class PgProxy:
    def __init__(self, target_url: str) -> None:
        self._target = urllib.parse.urlsplit(target_url)
        self.mode: Mode = "pass"
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cutting: set[asyncio.StreamWriter] = set()
        # A connection's tasks belong to whoever opened it (often a module-scoped
        # server's pool), not to the test running meanwhile: named "keep:" for the
        # leftover-task guard, and ended by close().
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def url(self, database: str) -> str:
        t = self._target
        userinfo = t.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(("postgresql", netloc, f"/{database}", "", ""))

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        t = self._target
        query = urllib.parse.parse_qs(t.query)
        port = t.port or 5432
        if "host" in query and query["host"][0].startswith("/"):
            return await asyncio.open_unix_connection(f"{query['host'][0]}/.s.PGSQL.{port}")
        return await asyncio.open_connection(t.hostname or "localhost", port)

    async def start(self) -> PgProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "refuse":
            for w in list(self._conns):
                w.transport.abort()  # the upstream side follows (see _handle)

    def cut(self) -> None:
        """Drop each open connection halfway through the next reply it carries."""
        self._cutting |= self._conns

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                await self._flowing.wait()
                if self.mode == "refuse":
                    break
                if dst in self._cutting:
                    self._cutting.discard(dst)
                    dst.write(data[: max(1, len(data) // 2)])
                    await dst.drain()
                    break
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Named when made: a task renamed by its own first line is anonymous
        # until it first runs, and on a loaded machine a test can end before.
        task = asyncio.create_task(self._handle(reader, writer), name="keep:pgproxy-connection")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await self._upstream()
        except OSError:
            writer.transport.abort()
            return
        self._conns.add(writer)  # the client's side: replies are cut on their way there
        try:
            await asyncio.gather(
                asyncio.create_task(self._pipe(reader, up_writer), name="keep:pgproxy-pipe"),
                asyncio.create_task(self._pipe(up_reader, writer), name="keep:pgproxy-pipe"),
            )
        finally:
            self._conns.discard(writer)
            self._cutting.discard(writer)
            up_writer.transport.abort()

    async def close(self) -> None:
        self.set_mode("refuse")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # "refuse" aborted every connection; wait for their tasks to see it.
        await asyncio.gather(*self._tasks, return_exceptions=True)
