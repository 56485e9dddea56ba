"""Stopping background tasks reliably; keeping heavy work off the event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger("fedhive.tasks")

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: Work on payloads at least this large runs in a worker thread: hashing, copying and NumPy
#: release the GIL, so the event loop keeps taking heartbeats while a big model is processed;
#: below it the thread hand-off (~0.1 ms) costs more than it saves.
OFF_LOOP_BYTES = 4 << 20


async def off_loop(
    nbytes: int, func: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs
) -> _R:
    """``func(*args, **kwargs)``, in a worker thread when it works on ``nbytes`` >=
    :data:`OFF_LOOP_BYTES` (so it never holds the event loop for long), else inline."""
    if nbytes >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(func, *args, **kwargs)
    return func(*args, **kwargs)


async def finish(tasks: Iterable[asyncio.Task[Any]], *, timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and wait for them, at most ``timeout`` seconds.

    Python 3.11's ``asyncio.wait_for`` (used inside aiomqtt's publish) can swallow a
    cancellation that races with its result, so a cancelled consumer may go back to waiting on
    its queue: callers close the transport first (which ends every message iterator), then call
    this. An exception other than cancellation is re-raised.
    """
    tasks = list(tasks)
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        _, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            log.warning("task %s did not stop within %s s", task.get_name(), timeout)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


_settled = False


def settle_gc() -> None:
    """Take what exists now (imported modules, pydantic schemas, NumPy's tables: ~10^5
    objects) out of the cycle collector's scans, once per process (``gc.freeze``).

    A component calls this when it starts serving. Every message allocates containers, so
    Python runs its cycle collector often, and each full collection walked all those
    long-lived objects: a third of a small-model agent's CPU. Frozen objects are still freed
    by reference counting; only cycles among them wait (``gc.unfreeze`` releases them)."""
    global _settled
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()
