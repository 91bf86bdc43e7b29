"""The engine thread, and the bridge from it to the server's event loop.

One thread drives the continuous-batching engine (ossgpt.inference.engine.Engine, whose `run` loops `step()` while
there is work and sleeps until a request arrives). The HTTP handlers live on an asyncio event loop in another
thread. Each request gets its own asyncio.Queue, which the engine thread fills with the request's events: a step's
events go over in one `loop.call_soon_threadsafe` (an asyncio queue may only be touched from its loop's thread).

    worker = Worker(lambda: Engine(model, max_batch=16), max_requests=16 + 64)
    worker.start()                        # inside the running event loop
    stream = worker.submit(request)       # QueueFullError past max_requests; ValueError if the request cannot fit
    async for event in stream:            # Event(request_id, token, finish_reason, prompt_tokens), the last one
        ...                               # with a finish_reason; EngineError if the engine broke meanwhile
    stream.close()                        # always: if the reply is not finished (the client went away), the
                                          # engine drops the request and frees its row at its next step
    worker.stop()

An exception in `engine.step()` cannot be pinned on one request: every request then in the engine gets
EngineError (the server answers 500), the engine is replaced by a new one (so nothing half-updated survives),
and the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections.abc import Callable


class QueueFullError(Exception):
    """As many requests as the worker takes are already running or waiting."""


class EngineError(RuntimeError):
    """The engine raised while this request was in it."""


class Stream:
    """One request's events, in order, as an async iterator; the last one has a finish_reason."""

    def __init__(self, worker: Worker, request_id: int):
        self.worker, self.request_id = worker, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, EngineError):
            self.finished = True
            raise item
        self.finished = item.finish_reason is not None
        return item

    def close(self) -> None:
        """Stop the request if it is still running (idempotent)."""
        if not self.finished:
            self.finished = True
            self.worker.cancel(self.request_id)


class Worker:
    """Owns the engine thread. make_engine() -> a new Engine (at start, and after a failure); max_requests: how many
    requests may be running or waiting at once (the engine's rows plus the queue)."""

    def __init__(self, make_engine: Callable[[], object], max_requests: int):
        self.make_engine, self.max_requests = make_engine, max_requests
        self.engine = make_engine()
        self.streams: dict[int, Stream] = {}  # the requests in the engine whose events someone awaits
        self.lock = threading.Lock()  # guards engine (which one) and streams
        self.stopped = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="ossgpt-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    @property
    def active(self) -> int:
        """Requests running or waiting."""
        with self.lock:
            return len(self.streams)

    def submit(self, request) -> Stream:
        """Queue an engine Request; call from the event loop's thread."""
        with self.lock:
            if len(self.streams) >= self.max_requests:
                raise QueueFullError(f"the server is busy: {len(self.streams)} requests are running or waiting")
            request_id = self.engine.submit(request)
            # Registered before the engine thread can deliver anything: delivering takes this lock too.
            stream = self.streams[request_id] = Stream(self, request_id)
        return stream

    def cancel(self, request_id: int) -> None:
        with self.lock:
            if self.streams.pop(request_id, None) is not None:
                self.engine.cancel(request_id)

    # -------------------------------------------------------------------------------------- the engine thread
    def _run(self) -> None:
        while not self.stopped.is_set():
            if not self._run_engine():
                self._fail_all()

    def _run_engine(self) -> bool:
        """Run the engine until stopped (True) or until it raises (False). The traceback, which holds the old
        engine, is gone once this returns: the new engine is never allocated beside the old one."""
        try:
            self.engine.run(self.stopped, self._deliver)
            return True
        except Exception:
            traceback.print_exc(file=sys.stderr)  # the server's log; the clients get a plain 500
            return False

    def _deliver(self, events) -> None:
        ready = []
        with self.lock:
            for event in events:
                stream = self.streams.get(event.request_id)
                if stream is None:  # cancelled: nobody is listening
                    continue
                if event.finish_reason is not None:
                    del self.streams[event.request_id]
                ready.append((stream, event))
        if ready:  # one wake-up of the event loop per step, not one per request: each costs a write to its pipe
            self.loop.call_soon_threadsafe(_put_all, ready)

    def _fail_all(self) -> None:
        with self.lock:
            failed, self.streams = self.streams, {}
            self.engine = None  # freed (its batch cache with it) before the new one is allocated
            self.engine = self.make_engine()
        self.loop.call_soon_threadsafe(
            _put_all, [(s, EngineError("the engine failed on this request")) for s in failed.values()]
        )


def _put_all(items) -> None:
    """On the event loop's thread: hand each (stream, event or EngineError) to its stream."""
    for stream, item in items:
        stream.queue.put_nowait(item)
