"""The uvicorn server around the app: deadlines on every connection, a connection cap, logs that cannot flood.

uvicorn closes a connection left idle after a response (``timeout_keep_alive``) but waits forever
for a request's headers and body, and accepts connections until the process runs out of file
descriptors; asyncio then logs a traceback for every failed ``accept()`` (162,000 of them, 66 MB,
in 20 s under a 256-descriptor limit, while /health timed out). Here, with uvicorn's own h11
protocol extended by :class:`GuardedH11Protocol`:

- a request's headers must be complete within ``header_timeout_s`` of its first byte (or of the
  connection opening), else the connection is closed (with a 408 when a partial request came);
- its body within ``body_timeout_s``: the app answers 408 (``limits.BodyTimeout``); a route that
  never reads its body has the connection closed here a little later;
- at most ``max_connections`` connections, kept below the descriptor limit: a connection past the
  cap closes one that is silent or half-sent, else one stalled in its body, else one idle between
  requests (the longest-idle first), so idle and slow sockets never lock out /health;
- a repeated log record is written once a minute with a count (:class:`RepeatedRecordFilter`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pneumo.errors import PneumoError

log = logging.getLogger("pneumo.serve.server")
FD_RESERVE = 32  # descriptors for all but client sockets: libraries, the model, logs (9 when idle)
# asyncio accepts up to `backlog` connections per turn of the loop, and a connection makes room two
# or three turns later (a task sets it up, then connection_made closes another, whose socket closes
# the turn after): the descriptors needed are the cap plus about four bursts. uvicorn's default
# backlog, 2048, ran out of 256 descriptors in one turn.
ACCEPT_BACKLOG = 32
ACCEPT_BURSTS = 4
BODY_BACKSTOP_S = 5.0  # after the body deadline, the time the app has to answer 408 itself
STALLED_BODY_S = 1.0  # a body with no bytes for this long may be cut off when the cap is reached
EVICTED = {0: "silent or half-sent", 1: "stalled upload", 2: "keep-alive"}
NOISY_LOGGERS = ("asyncio", "uvicorn.error", "pneumo.serve.app", "pneumo.serve.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take and how many may be connected; the defaults suit a LAN."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0  # 20 MB in 60 s is 2.7 Mbit/s
    keep_alive_s: float = 5.0
    max_connections: int = 100
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            option = "--" + name.removesuffix("_s").replace("_", "-")
            if not 0 < getattr(self, name) <= 3600:
                raise PneumoError(f"{option} must be in (0, 3600] seconds, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise PneumoError(f"--max-connections must be at least 1, got {self.max_connections}")
        if self.max_header_bytes < 1024:
            raise PneumoError(f"max_header_bytes must be at least 1024, got {self.max_header_bytes}")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines and room-making at the connection cap."""

    limits: ConnectionLimits  # set on the subclass that :func:`guarded_protocol` makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.last_active = self.loop.time()
        self.answered = 0  # responses completed on this connection
        self.deadline: asyncio.TimerHandle | None = None
        self.deadline_phase: str | None = None
        self._watch("headers")
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        super().data_received(data)
        self._watch(self._phase())

    def on_response_complete(self) -> None:
        self.last_active = self.loop.time()
        self.answered += 1
        super().on_response_complete()
        self._watch(self._phase() if self.conn.their_state is not h11.IDLE else None)  # idle: keep-alive rules

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch(None)
        super().connection_lost(exc)

    def is_idle(self) -> bool:
        """No request in flight: waiting for one (possibly half-sent) or between requests."""
        in_flight = self.cycle is not None and not self.cycle.response_complete
        return self.conn.their_state is h11.IDLE and not in_flight and not self.transport.is_closing()

    def eviction_rank(self, now: float) -> int | None:
        """Which connections give way first when the cap is reached (lower first); None: never.

        0: idle and never answered (silent, or headers still trickling in): what a flood is made of;
        1: stalled in its body (nothing for STALLED_BODY_S); 2: idle between requests (keep-alive).
        A request whose body has arrived is never cut off.
        """
        if self.transport.is_closing():
            return None
        if self.is_idle():
            return 2 if self.answered else 0
        if self.conn.their_state is h11.SEND_BODY and now - self.last_active >= STALLED_BODY_S:
            return 1
        return None

    def _phase(self) -> str | None:
        if self.transport.is_closing():
            return None
        if self.is_idle():
            return "headers"
        return "body" if self.conn.their_state is h11.SEND_BODY else None

    def _watch(self, phase: str | None) -> None:
        """Arm the deadline of ``phase`` (headers or body) unless it is already running; None disarms."""
        if phase == self.deadline_phase:
            return
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline, self.deadline_phase = None, phase
        if phase is not None:
            delay = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s + BODY_BACKSTOP_S
            self.deadline = self.loop.call_later(delay, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self.deadline, self.deadline_phase = None, None
        if self._phase() != phase:
            return
        if phase == "headers" and self.conn.trailing_data[0]:  # a partial request: say why it ends
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        log.info("closed a connection that took longer than the %s deadline", phase)
        self._close()

    def _close(self) -> None:
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass  # mid-response: nothing more to say
        self.transport.close()

    def _make_room(self) -> None:
        now = self.loop.time()
        ranked = [
            (rank, c.last_active, id(c), c)
            for c in self.connections
            if c is not self and isinstance(c, GuardedH11Protocol) and (rank := c.eviction_rank(now)) is not None
        ]
        if ranked:
            rank, _, _, victim = min(ranked)
            victim._close()
            log.warning("%d connections (the cap): closed a %s one", self.limits.max_connections, EVICTED[rank])
        else:
            log.warning("%d connections, each with a request in flight: refusing a new one", len(self.connections))
            self._close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class RepeatedRecordFilter(logging.Filter):
    """Let the first of a run of like records through, count the rest, say how many on the next one.

    Records are alike when they come from the same logger at the same level with the same message
    template and the same exception type and errno; a record passes again ``window_s`` after the
    last one that passed, carrying the count of those dropped in between.
    """

    def __init__(self, window_s: float = 60.0, clock: Any = time.monotonic, max_kinds: int = 1000):
        super().__init__()
        self.window_s, self.clock, self.max_kinds = window_s, clock, max_kinds
        self.kinds: dict[tuple, list] = {}  # kind -> [time it last passed, records dropped since]

    @staticmethod
    def kind(record: logging.LogRecord) -> tuple:
        exc = record.exc_info[1] if record.exc_info else None
        first_line = str(record.msg).split("\n", 1)[0]
        return record.name, record.levelno, first_line, type(exc).__name__, getattr(exc, "errno", None)

    def filter(self, record: logging.LogRecord) -> bool:
        now, kind = self.clock(), self.kind(record)
        seen = self.kinds.get(kind)
        if seen is not None and now - seen[0] < self.window_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg}\n(the same {seen[1]} more times in the last {now - seen[0]:.0f} s)"
        if seen is None and len(self.kinds) >= self.max_kinds:
            self.kinds.pop(next(iter(self.kinds)))
        self.kinds[kind] = [now, 0]
        return True


def log_repeats_once(window_s: float = 60.0) -> RepeatedRecordFilter:
    """Install one :class:`RepeatedRecordFilter` on the loggers a server under attack floods (idempotent)."""
    for name in NOISY_LOGGERS:
        for old in [f for f in logging.getLogger(name).filters if isinstance(f, RepeatedRecordFilter)]:
            logging.getLogger(name).removeFilter(old)
    flt = RepeatedRecordFilter(window_s)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(flt)
    return flt


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE, first raised to the hard limit (as a server should); 1024 where unknown."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int, reserved: int) -> int:
    """``wanted`` connections, or fewer when the descriptor limit cannot hold them, ``reserved`` others
    and the bursts of accepted connections not yet counted."""
    room = descriptor_limit() - FD_RESERVE - reserved - ACCEPT_BURSTS * ACCEPT_BACKLOG
    if wanted > room:
        log.warning("the descriptor limit allows %d connections, not %d: capping there", max(1, room), wanted)
    return max(1, min(wanted, room))


def uvicorn_config(app: Any, host: str, port: int, limits: ConnectionLimits, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn settings for these limits (uvicorn's own where it has one)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_s,
        # uvicorn answers 503 to every request while connections reach this. Past the cap each new
        # connection closes another, but the closed ones linger for a turn or two of the loop, so
        # bursts of accepts overshoot the cap: only past them does uvicorn step in.
        limit_concurrency=limits.max_connections + ACCEPT_BURSTS * ACCEPT_BACKLOG,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        backlog=ACCEPT_BACKLOG,
    )
