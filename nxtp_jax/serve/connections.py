"""What happens to connections before the app sees a request: header deadline, connection cap,
the open-file limit, JSON errors from the HTTP layer, and the drain on SIGTERM.

uvicorn's h11 protocol closes a connection only after a response (its keep-alive timer), so
a client that never sends complete headers (nothing, or 1 byte per second) would hold its
socket forever. `protocol(...)` returns an h11 protocol class that also:

- closes a connection that has not sent complete request headers within `header_timeout_s`
  of opening or of its last response (so an idle keep-alive connection is closed too);
- answers 503 (JSON) and closes any connection beyond `max_connections` open ones;
- answers the HTTP layer's own 400 (a malformed request, headers above the size limit) as
  JSON, like every other error of the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
from typing import Callable, Iterator

import uvicorn
from absl import logging
from uvicorn.protocols.http.h11_impl import H11Protocol

# Open files the process needs besides its connections: checkpoint files, JAX's and PIL's
# threads, the log, the listening socket. --max_connections plus this must fit the soft limit.
RESERVED_FILES = 256


def raw_json_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def protocol(*, header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.over_cap = len(self.connections) > max_connections
            self.header_timer: asyncio.TimerHandle | None = None
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self.header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.over_cap:
                self.transport.write(raw_json_response(
                    503, "Service Unavailable",
                    f"too many open connections (--max_connections={max_connections}); retry later",
                ))
                self.transport.close()
                return
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # a request's headers are in
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle.response_complete:  # no pipelined request started
                # The next request's headers get the same deadline, and so does the rest of
                # an unread body of the last one (after a 413, say).
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self.transport.write(raw_json_response(400, "Bad Request", f"invalid HTTP request: {msg}"))
            self.transport.close()

    return GuardedH11Protocol


def raise_open_file_limit() -> tuple[int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit, as servers do; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


class Server(uvicorn.Server):
    """uvicorn's server whose SIGTERM/SIGINT start a bounded drain and end with exit status 0.

    uvicorn stops accepting and waits for open requests; `on_drain` (the service's) finishes
    what it can within the drain time and answers the rest 503. uvicorn's own handlers would
    re-raise the signal after shutting down, which kills the process with status -15.
    """

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None]):
        super().__init__(config)
        self.on_drain = on_drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._drain, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _drain(self, sig: int) -> None:
        if self.should_exit:  # a second signal: stop now
            self.force_exit = True
            return
        logging.warning("%s: draining (no new connections; queued requests finish or get 503)", signal.Signals(sig).name)
        self.should_exit = True
        self.on_drain()
