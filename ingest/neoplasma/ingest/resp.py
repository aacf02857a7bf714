"""A small Redis client speaking RESP2 over asyncio, parsed by hiredis.

Only what ingest needs: commands with one reply each (AUTH, SELECT, EVAL) and a subscribed
connection read in bulk. Measured against redis-py's PubSub on this machine it reads about
twice as many messages per second (bench/redis_ingest.py), which is why it exists.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from neoplasma.core.errors import UsageError

READ_BYTES = 1 << 20


class RedisError(Exception):
    """Redis answered with an error, closed the connection, or did not answer in time."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is and how to log in: from `host:port` or `redis[s]://[user:password@]host:port`."""

    host: str
    port: int
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS: the CA bundle that signed Redis's certificate (default: the system's)

    @classmethod
    def parse(cls, text: str, *, db: int = 0, password: str | None = None, ca_file: str | None = None) -> RedisAddress:
        url = urlsplit(text if "://" in text else f"redis://{text}")
        if url.scheme not in ("redis", "rediss") or not url.hostname or url.path.strip("/") or url.query:
            raise UsageError(f"the Redis address must be HOST:PORT or redis[s]://[USER:PASSWORD@]HOST:PORT, not "
                             f"{text!r} (give the database with --redis-db)")
        try:
            port = url.port or 6379
        except ValueError:
            raise UsageError(f"the Redis address {text!r} has a bad port") from None
        return cls(url.hostname, port, url.scheme == "rediss", db, unquote(url.username) if url.username else None,
                   password or (unquote(url.password) if url.password else None), ca_file)

    def __str__(self) -> str:  # no password
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def encode(*args: str | bytes) -> bytes:
    """A command as RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()

    @classmethod
    async def open(cls, address: RedisAddress, timeout: float) -> Connection:
        """Connected, logged in and on the database of `address`; RedisError or OSError if not."""
        context = ssl.create_default_context(cafile=address.ca_file) if address.tls else None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port, ssl=context),
                                                    timeout)
        except TimeoutError:
            raise RedisError(f"no connection to {address} within {timeout:g}s") from None
        conn = cls(reader, writer)
        try:
            if address.password is not None:
                login = (address.username, address.password) if address.username else (address.password,)
                await asyncio.wait_for(conn.call("AUTH", *login), timeout)
            if address.db:
                await asyncio.wait_for(conn.call("SELECT", str(address.db)), timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def send(self, *args: str | bytes) -> None:
        self._writer.write(encode(*args))

    async def call(self, *args: str | bytes) -> Any:
        """Send one command and return its reply (RedisError for an error reply)."""
        self.send(*args)
        while (reply := self._parser.gets()) is False:
            await self._feed()
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(f"redis refused {args[0]!r}: {reply}")
        return reply

    async def replies(self) -> list[Any]:
        """Every reply that has arrived, waiting for at least one (a subscribed connection's messages);
        RedisError for an error reply."""
        await self._feed()
        out = []
        while (reply := self._parser.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise RedisError(f"redis refused: {reply}")
            out.append(reply)
        return out

    async def _feed(self) -> None:
        data = await self._reader.read(READ_BYTES)
        if not data:
            raise RedisError("redis closed the connection")
        self._parser.feed(data)

    def close(self) -> None:
        self._writer.close()
