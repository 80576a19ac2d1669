"""Live progress of the flow runs in this process, for callers that run the flow in-process.

``nst run`` starts the flow in its own process (Prefect's ephemeral server or ``PREFECT_API_URL``'s),
so it can listen here and print a progress line as each batch finishes; the Prefect UI has the
run's progress artifact for the same figures. Listeners are called on the flow's thread and must be
quick; one that raises is dropped with a warning rather than failing the run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where a run stands: ``done`` of ``total`` manifest rows settled (any status), ``failed`` of
    them failed and ``invalid`` of them invalid, ``elapsed_s`` since the run started."""

    total: int
    done: int
    failed: int
    invalid: int
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far (None before any row is settled)."""
        if self.done <= 0 or self.done >= self.total:
            return None if self.done <= 0 else 0.0
        return self.elapsed_s * (self.total - self.done) / self.done


Listener = Callable[[Progress], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener(progress)`` for every progress update of the runs in this process while inside."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)


def publish(progress: Progress) -> None:
    """Hand ``progress`` to every listener (a no-op when nobody listens, as in a deployment)."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(progress)
        except Exception as exc:  # a broken display must not fail a run
            log.warning("progress listener %r failed (%s); dropped", listener, exc)
            with _lock:
                if listener in _listeners:
                    _listeners.remove(listener)
