"""AsyncEngine: the engine loop in a background thread, with an async stream per request.

The LLMEngine is not thread-safe, so every call into it (the loop's steps, adding, aborting,
session look-ups) runs under one lock, and each one ends by publishing `stats`, a snapshot that
other threads (metrics, health) read instead of the engine. Steps run in their own thread so the event loop keeps
serving while the model computes (torch releases the GIL). A consumer that stops iterating
(a client that disconnected) aborts its request, which frees its slot and blocks at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .llm_engine import LLMEngine, RequestOutput
from .params import SamplingParams
from .stats import EngineStats


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, start_thread: bool = True):
        """With `start_thread` False, the caller runs `run_loop` in a thread of its choosing (the
        server gives it the process's main thread, where prefill runs faster than on another:
        docs/benchmarks.md)."""
        self.engine = engine
        # Called (in the engine thread) with every output as it is produced, aborts included:
        # the one place where metrics see each request finish exactly once.
        self.on_output: Callable[[RequestOutput], None] | None = None
        self._lock = threading.Lock()
        self.stats: EngineStats = engine.stats()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._persisting: set[str] = set()  # finished requests whose output waits for its session write
        self._accepting = True
        self._stop = False
        self._shutdown: asyncio.Future | None = None
        self._loop_done = threading.Event()
        self.step_error: BaseException | None = None
        if start_thread:
            threading.Thread(target=self.run_loop, name="mcserve-engine", daemon=True).start()

    # --- requests --------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
                       request_id: str | None = None, session_id: str | None = None,
                       resume_from: str | None = None, cache_salt: str = "") -> AsyncIterator[RequestOutput]:
        """Stream the outputs of `n` samples (each output names its `index`). Errors in the
        request (bad prompt, busy session...) are raised before the first output."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def add():
            if session_id is not None:
                seqs = [self.engine.add_request(prompt_ids, params, request_id, session_id=session_id,
                                                resume_from=resume_from, cache_salt=cache_salt)]
            else:
                seqs = self.engine.add_group(prompt_ids, params, n, request_id, cache_salt)
            for seq in seqs:
                self._streams[seq.request_id] = (loop, queue)
            return seqs

        if session_id is not None and self.engine.sessions is not None:
            # Read the saved state off the engine's lock; `add` then finds it in memory.
            await asyncio.to_thread(self.engine.sessions.prefetch, resume_from or session_id)
        seqs = await self.call(add)
        self._wakeup.set()
        unfinished = {s.request_id for s in seqs}
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            if unfinished:  # the consumer went away (or failed): stop the work it no longer wants
                await self.call(self._abort_all, list(unfinished))
            for seq in seqs:
                self._streams.pop(seq.request_id, None)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` under the engine lock, off the event loop."""
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn, *args):
        with self._lock:
            try:
                return fn(*args)
            finally:
                self.stats = self.engine.stats()

    async def abort(self, group_id: str) -> list[RequestOutput]:
        """Abort a request (all its samples) from outside its stream, e.g. when the client of a
        streaming response disconnects; returns the final 'abort' outputs."""
        def run():
            outputs = self.engine.abort_group(group_id)
            for out in outputs:
                self._deliver(out.request_id, out)
                self._streams.pop(out.request_id, None)  # its consumer is gone
            return outputs
        return await self.call(run)

    def _abort_all(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            final = self.engine.abort(rid)
            if final is not None:
                self._deliver(rid, final)

    # --- lifecycle -------------------------------------------------------------------------
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def draining(self) -> bool:
        """Shutting down: in-flight requests finish, new ones are refused."""
        return not self._accepting

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s`, then abort the rest
        (a session saves what it has read) and stop the loop. Safe to call more than once."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain(grace_s))
        await asyncio.shield(self._shutdown)

    async def _drain(self, grace_s: float) -> None:
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.call(self._abort_all, list(self.engine.sequences))
        if self.engine.sessions is not None:
            await asyncio.to_thread(self.engine.sessions.flush)
        self._stop = True
        self._wakeup.set()
        await asyncio.to_thread(self._loop_done.wait, 10)

    # --- the loop --------------------------------------------------------------------------
    def run_loop(self) -> None:
        """Step the engine until shutdown; returns when the loop has stopped."""
        try:
            self._loop()
        finally:
            self._loop_done.set()

    def stop_loop(self) -> None:
        """Stop the loop without draining (the HTTP side ended before any shutdown began)."""
        self._stop = True
        self._wakeup.set()

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_unfinished()
                try:
                    outputs = self.engine.step() if busy else []
                except Exception as e:  # noqa: BLE001 - a bug must not hang the clients: fail their requests
                    self.step_error = e
                    outputs = []
                    self._fail_everything(e)
                self.stats = self.engine.stats()
            self._deliver_step(outputs)
            if not busy:
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()

    def _fail_everything(self, error: Exception) -> None:
        # Every open stream, not only the engine's sequences: the failed step may have finished
        # some (and forgotten them) before it raised, and their outputs are lost with it.
        for rid in list(self._streams):
            if rid not in self._persisting:  # finished earlier: its output comes once saved
                self._deliver(rid, RuntimeError(f"engine step failed: {error}"))
        for rid in list(self.engine.sequences):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - keep going: every sequence must be freed
                continue

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams with one wake-up of each event loop, not one
        per output: the loop's thread shares the GIL with this one, and every wake-up it
        takes stretches the step."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._route(out.request_id, out)
            if stream is not None:
                batches.setdefault(stream[0], []).append((stream[1], out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item) -> None:
        """Hand one output (or an error) to its stream."""
        stream = self._route(request_id, item)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _route(self, request_id: str, item) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None:
        """Where `item` goes now: its stream's loop and queue, or None (no stream, or held back).
        A turn whose session write is pending (durable sessions) is handed over when the write
        has landed, so the client's response completes only after its session is on stable
        storage."""
        persisted = getattr(item, "persisted", None)
        if persisted is not None and not persisted.done():
            self._persisting.add(request_id)
            persisted.add_done_callback(lambda _: self._deliver(request_id, item))
            return None
        self._persisting.discard(request_id)
        if self.on_output is not None and isinstance(item, RequestOutput):
            self.on_output(item)
        return self._streams.get(request_id)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
