"""Prometheus metrics, vLLM's names under `mcserve:`, plus the memory cache.

Request metrics are recorded by the HTTP layer as outputs stream; the state of the engine and of
the memory cache (checkpoint blocks and bytes per tier, sessions per tier, prefix reuse, evictions,
swaps) is read at scrape time by a collector, so it is never stale.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.llm_engine import LLMEngine, RequestOutput

P = "mcserve:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector:
    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def collect(self):
        e = self.engine
        sched, pool, runner = e.scheduler, e.scheduler.pool, e.runner
        yield _gauge("num_requests_running", "Requests holding an online slot.", len(sched.running))
        yield _gauge("num_requests_waiting", "Requests queued for a slot.", len(sched.waiting))
        yield _gauge("num_requests_swapped", "Requests whose state is parked in host memory.", len(sched.swapped))
        blocks = GaugeMetricFamily(P + "checkpoint_blocks", "Checkpoint blocks by tier and state.",
                                   labels=["tier", "state"])
        nbytes = GaugeMetricFamily(P + "checkpoint_bytes", "Bytes of checkpoint blocks by tier and state.",
                                   labels=["tier", "state"])
        block_size = runner.block_nbytes()
        for tier in ("device", "host"):
            t = pool[tier]
            for state, n in (("used", t.num_used), ("cached", t.num_cached), ("free", len(t.free_ids))):
                blocks.add_metric([tier, state], n)
                nbytes.add_metric([tier, state], n * block_size)
        yield blocks
        yield nbytes
        yield _gauge("cached_checkpoints", "Segment checkpoints held on the device (in use or cached for reuse).",
                     pool.device.num_used + pool.device.num_cached)
        S = e.model.config.segment_size
        yield _counter("prefix_cache_queries", "Prompt tokens looked up for prefix reuse.", pool.prefix_queries * S)
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", pool.prefix_hits * S)
        evictions = CounterMetricFamily(P + "evictions", "Evictions by kind.", labels=["kind"])
        evictions.add_metric(["checkpoint_block"], pool.device.evictions)
        swaps = CounterMetricFamily(P + "preemptions", "Preempted requests by how.", labels=["kind"])
        swaps.add_metric(["swap_out"], sched.num_swapped_out)
        swaps.add_metric(["swap_in"], sched.num_swapped_in)
        swaps.add_metric(["recompute"], sched.num_recomputed)
        if e.sessions is not None:
            index = e.sessions.index
            evictions.add_metric(["session_memory"], index.evictions["memory"])
            evictions.add_metric(["session_disk"], index.evictions["disk"])
            sessions = GaugeMetricFamily(P + "sessions", "Saved sessions by tier.", labels=["tier"])
            session_bytes = GaugeMetricFamily(P + "session_bytes", "Bytes of saved sessions by tier.", labels=["tier"])
            for tier in ("memory", "disk"):
                sessions.add_metric([tier], index.count(tier))
                session_bytes.add_metric([tier], index.nbytes(tier))
            yield sessions
            yield session_bytes
            writer = e.sessions.writer
            yield _counter("session_write_errors", "Session files that could not be written.",
                           len(writer.errors) if writer is not None else 0)
        yield evictions
        yield swaps


def _gauge(name, doc, value):
    g = GaugeMetricFamily(P + name, doc)
    g.add_metric([], value)
    return g


def _counter(name, doc, value):
    c = CounterMetricFamily(P + name, doc)
    c.add_metric([], value)
    return c


class Metrics:
    def __init__(self, engine: LLMEngine):
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens received.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(P + "request_success", "Finished requests by reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between streamed tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time waiting before first scheduled.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.resume = Histogram(P + "session_resume_latency_seconds", "Time to load a saved session.",
                                buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(engine))
        self._last_token: dict[str, float] = {}

    def observe(self, out: RequestOutput) -> None:
        """Record one output as the engine produces it (called from the engine thread)."""
        now = time.monotonic()
        self.generation_tokens.inc(len(out.new_token_ids))
        last = self._last_token.get(out.request_id)
        if last is None and out.first_token_time is not None:
            self.ttft.observe(out.first_token_time - out.arrival_time)
            if out.first_scheduled_time is not None:
                self.queue.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
            if out.resume_seconds is not None:
                self.resume.observe(out.resume_seconds)
        elif last is not None and out.new_token_ids:
            self.itl.observe(now - last)
        self._last_token[out.request_id] = now
        if out.finished:
            self._last_token.pop(out.request_id, None)
            self.e2e.observe(now - out.arrival_time)
            self.request_success.labels(finished_reason=out.finish_reason or "unknown").inc()
