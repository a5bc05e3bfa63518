"""The spool: every accepted instance lies on disk before the SCP answers success.

An instance is written to ``incoming/``, flushed and fsynced, renamed into ``queue/`` and the folder
fsynced: only then does the SCP answer success, so a crash or a kill loses no accepted image, and a
half-written file (never acknowledged) is removed at the next start. A file leaves ``queue/`` only once
its results are stored at the destination and its reading is in the audit database. File names are
the arrival time in nanoseconds and a random part: they sort in arrival order, carry the arrival time
(for the arrival-to-result latency) and say nothing about the patient. The queue is bounded:
``put`` returns None when it is full and the SCP answers Out of Resources.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from pathlib import Path

QUEUE, INCOMING = "queue", "incoming"
SUFFIX = ".dcm"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def arrival_seconds(path: Path) -> float:
    """When a spooled instance arrived (epoch seconds), from its name."""
    return int(path.name.split("-", 1)[0]) / 1e9


class Spool:
    """A bounded on-disk queue of received instances (Part 10 files), worked off in arrival order."""

    def __init__(self, folder: str | Path, limit: int = 64):
        if limit < 1:
            raise ValueError(f"the spool's limit must be at least 1, got {limit}")
        self.folder, self.limit = Path(folder), limit
        self.queue_dir, self.incoming = self.folder / QUEUE, self.folder / INCOMING
        for d in (self.folder, self.queue_dir, self.incoming):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for partial in self.incoming.iterdir():  # written but never acknowledged
            partial.unlink(missing_ok=True)
        self._lock = threading.Lock()
        waiting = sorted(self.queue_dir.glob(f"*{SUFFIX}"))
        self._pending = {p.name for p in waiting}
        self._ready: queue.Queue[Path] = queue.Queue()
        for p in waiting:
            self._ready.put(p)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def put(self, data: bytes) -> Path | None:
        """Store ``data`` durably and queue it; None when the queue is full (nothing written)."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}{SUFFIX}"
        with self._lock:
            if len(self._pending) >= self.limit:
                return None
            self._pending.add(name)
        tmp, final = self.incoming / name, self.queue_dir / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self.queue_dir)
        except BaseException:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._pending.discard(name)
            raise
        self._ready.put(final)
        return final

    def take(self, timeout: float | None = None) -> Path | None:
        """The next instance to work on, or None after ``timeout`` seconds with none."""
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            return None

    def requeue(self, path: Path) -> None:
        """Put an instance back at the end (its results could not be delivered yet)."""
        self._ready.put(path)

    def done(self, path: Path) -> None:
        """The instance's results are delivered and recorded: remove it for good."""
        path.unlink(missing_ok=True)
        _fsync_dir(self.queue_dir)
        with self._lock:
            self._pending.discard(path.name)
