"""The intake processor of ``omni serve`` in a process of its own, supervised.

``omni serve`` answers HTTP in one process (or ``--workers N``) and ingests what the tracking API queued
(:mod:`profiles.intake`) in a separate child process, so that validation and storage never hold the
event loop's GIL: request latency stays flat while the processor works, and the two use both cores.

- :class:`ProcessorSupervisor` (in the ``omni serve`` process) starts the child (``python -m
  omni.server.processor RUN_DIR PARENT_PID``) and starts it again, after a pause that grows while it keeps
  failing, whenever it exits without being asked to; at shutdown it stops it with SIGTERM (the
  transaction under way finishes or rolls back, nothing is lost either way).
- The child writes a heartbeat (``RUN_DIR/processor.json``) every second; ``/healthz`` of every worker
  reads it (:func:`processor_problem`) and answers 503 when it is missing or stale.
- After each commit the tracking API's writer sends a datagram to ``RUN_DIR/wake.sock``
  (:class:`Waker`), so the processor starts at once; it also looks at the queue every
  ``poll_seconds`` for rows that other hosts accepted.
- The child exits when its parent is gone (``omni serve`` killed): a new ``omni serve`` starts its own.

The queue's guarantees hold across all of this: a request leaves the queue in the transaction that stores
its events, so a killed processor (or server) loses nothing and ingests nothing twice.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from profiles.intake import IntakeProcessor

log = logging.getLogger("omni.server.processor")

# The directory of one `omni serve` run (heartbeat, wake socket), passed to its workers.
RUN_DIR_ENV = "OMNI_SERVE_RUN_DIR"
HEARTBEAT = "processor.json"
WAKE_SOCKET = "wake.sock"
# The heartbeat is written every BEAT_SECONDS; older than STALE_SECONDS: the processor is not running.
BEAT_SECONDS = 1.0
STALE_SECONDS = 5.0


class Waker:
    """Wakes the processor of a run directory: one datagram, never blocking, never failing (a processor
    that is not listening polls the queue anyway)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = str(run_dir / WAKE_SOCKET)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def __call__(self) -> None:
        try:
            self.sock.sendto(b"w", self.path)
        except OSError:  # not listening (restarting), or its buffer is full: it is awake already
            pass


def processor_problem(run_dir: Path, *, now: float | None = None) -> str | None:
    """Why the processor of ``run_dir`` is not running (no heartbeat, a stale one, or its process is
    gone), or None."""
    path = run_dir / HEARTBEAT
    try:
        beat = path.stat().st_mtime
        pid = json.loads(path.read_bytes()).get("pid")
    except (OSError, ValueError, AttributeError):
        return "not running"
    age = (time.time() if now is None else now) - beat
    if age > STALE_SECONDS:
        return f"not running (last seen {age:.0f} s ago)"
    if isinstance(pid, int) and not _exists(pid):
        return "not running (its process is gone)"
    return None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True


def processor_capacity(run_dir: Path) -> float | None:
    """The bytes of requests per second the processor of ``run_dir`` last said it ingests, if it has
    measured it (the tracking API's writer sheds load by it)."""
    try:
        capacity = json.loads((run_dir / HEARTBEAT).read_bytes()).get("capacity")
    except (OSError, ValueError, AttributeError):
        return None
    return float(capacity) if isinstance(capacity, int | float) and capacity > 0 else None


def _beat(run_dir: Path, processor: IntakeProcessor) -> None:
    """The heartbeat: written anew (atomically) every :data:`BEAT_SECONDS`."""
    temporary = run_dir / f".{HEARTBEAT}.{os.getpid()}"
    beat = {"pid": os.getpid(), "processed": processor.processed, "capacity": processor.capacity}
    temporary.write_text(json.dumps(beat))
    temporary.replace(run_dir / HEARTBEAT)


def run(run_dir: Path, parent: int) -> int:
    """The child process: run the intake processor until SIGTERM, or until ``parent`` is gone."""
    from omni.core.settings import get_settings
    from profiles.db import create_store_engine
    from profiles.ingest import IngestOptions
    from profiles.intake import IntakeOptions, IntakeProcessor

    settings = get_settings()
    engine = create_store_engine(settings.database_url)
    processor = IntakeProcessor(
        engine, IntakeOptions.of(settings, engine.dialect.name, IngestOptions.of(settings))
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: omni serve stops us
    wake_path = run_dir / WAKE_SOCKET
    wake_path.unlink(missing_ok=True)
    wake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    wake.bind(str(wake_path))
    wake.settimeout(BEAT_SECONDS)
    processor.start()
    log.info("intake processor %d started (store: %s)", os.getpid(), engine.dialect.name)
    code = 0
    try:
        while not stop.is_set():
            if os.getppid() != parent:
                log.warning("intake processor %d: omni serve is gone; stopping", os.getpid())
                break
            if not processor.alive:
                log.error("intake processor %d: its thread died; exiting to be restarted", os.getpid())
                code = 1
                break
            _beat(run_dir, processor)
            deadline = time.monotonic() + BEAT_SECONDS
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                try:
                    wake.settimeout(left)
                    wake.recv(64)
                except TimeoutError:
                    break
                processor.wake()
    finally:
        processor.stop()
        wake.close()
        wake_path.unlink(missing_ok=True)
        (run_dir / HEARTBEAT).unlink(missing_ok=True)
        engine.dispose()
    return code


class ProcessorSupervisor:
    """Runs the processor child of ``omni serve`` and restarts it when it dies (see the module)."""

    def __init__(self, run_dir: Path, *, max_pause: float = 30.0) -> None:
        self.run_dir = run_dir
        self.max_pause = max_pause
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="omni-processor-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stop.is_set():
                return None
            self._process = subprocess.Popen(
                [sys.executable, "-m", "omni.server.processor", str(self.run_dir), str(os.getpid())]
            )
            return self._process

    def _run(self) -> None:
        pause = 1.0
        while True:
            process = self._spawn()
            if process is None:
                return
            started = time.monotonic()
            code = process.wait()
            if self._stop.is_set():
                return
            if time.monotonic() - started > 60:
                pause = 1.0
            self.restarts += 1
            log.error("the intake processor exited with code %s; starting it again in %.0f s", code, pause)
            if self._stop.wait(pause):
                return
            pause = min(pause * 2, self.max_pause)

    def stop(self, timeout: float = 30) -> None:
        with self._lock:
            self._stop.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("the intake processor did not stop within %.0f s; killing it", timeout)
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    run_dir, parent = Path(sys.argv[1]), int(sys.argv[2])
    sys.exit(run(run_dir, parent))


if __name__ == "__main__":
    main()
