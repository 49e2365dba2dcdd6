"""The write-progress deadline of one connection: bytes written to it that its client does not take for
SEND_TIMEOUT s cut the connection off, whether they wait in asyncio's buffer or in the kernel's."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import sys
from collections.abc import Callable

# Linux's SIOCOUTQNSD: bytes of a socket's send queue not sent yet, which is where a response waits once the
# client's receive window is closed. The kernel's buffer grows to megabytes, so a whole response may sit there
# while asyncio sees nothing pending. (Elsewhere only asyncio's own buffer is watched.)
SIOCOUTQNSD = 0x894B
# How often `delivered` looks at the queues: from a few milliseconds (what a healthy client takes) up to this.
MAX_POLL_S = 0.1


class SendWatch:
    """Started when a connection has bytes its client has not taken (asyncio paused the writes, or a response
    ended with bytes still queued); every `timeout` s it looks again, stops once they are all taken, waits
    another period when some were, and otherwise resets the connection and calls `on_timeout`."""

    def __init__(
        self,
        transport: asyncio.Transport,
        timeout: float,
        on_timeout: Callable[[], None] | None,
        logger: logging.Logger,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.logger = logger
        self.lost = False
        self._loop = asyncio.get_event_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0
        sock = transport.get_extra_info("socket")
        self._fd: int | None = sock.fileno() if sock is not None and sys.platform == "linux" else None

    def unsent(self) -> int:
        """Bytes written to the connection that have not left this host."""
        pending = self.transport.get_write_buffer_size()
        if self._fd is not None and not self.lost:
            try:
                pending += struct.unpack("i", fcntl.ioctl(self._fd, SIOCOUTQNSD, b"\0" * 4))[0]
            except OSError:
                self._fd = None  # not a TCP socket (a Unix one): asyncio's buffer is all there is
        return pending

    def start(self) -> None:
        """Begin watching unless already watching."""
        if self._timer is None and not self.lost:
            self._last = self.unsent()
            self._timer = self._loop.call_later(self.timeout, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self) -> None:
        self.lost = True
        self.stop()

    async def delivered(self) -> bool:
        """Waits until every byte written so far has left this host (True), or the connection is lost,
        which the deadline brings about for a client that takes nothing (False)."""
        delay = 0.002
        while not self.lost:
            if self.unsent() == 0:
                return True
            self.start()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_POLL_S)
        return False

    def _check(self) -> None:
        self._timer = None
        unsent = self.unsent()
        if unsent == 0 or self.lost:
            return
        if (
            unsent != self._last
        ):  # the client took some (a slow reader, not a stalled one), or a new answer began
            self.start()
            return
        self.logger.info("closing a connection that took none of %d bytes for %g s", unsent, self.timeout)
        if self.on_timeout is not None:
            self.on_timeout()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: the kernel drops what it still holds for this client and resets the connection,
            # rather than keep trying to send it after the socket is closed.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # abort, not close: close waits for asyncio's buffer to be written, which is what never happens.
        self.transport.abort()
