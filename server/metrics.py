"""Prometheus metrics, vLLM's names under `mcserve:`, plus the memory cache.

Request metrics are recorded by the HTTP layer as outputs stream; the state of the engine and of
the memory cache (checkpoint blocks and bytes per tier, sessions per tier, prefix reuse, evictions,
swaps) comes from the snapshots the engine and the store publish (engine/stats.py).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from engine.async_engine import AsyncEngine
from engine.llm_engine import RequestOutput
from engine.sessions import WRITE_BUCKETS
from engine.stats import StoreStatsSnapshot

P = "mcserve:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector:
    """Reads only snapshots: the engine's, published under its lock each step, and the store's,
    taken under the store's lock; never the live scheduler or index."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        e = self.engine.stats
        yield _gauge("num_requests_running", "Requests holding an online slot.", e.num_running)
        yield _gauge("num_requests_waiting", "Requests queued for a slot.", e.num_waiting)
        yield _gauge("num_requests_swapped", "Requests whose state is parked in host memory.", e.num_swapped)
        blocks = GaugeMetricFamily(P + "checkpoint_blocks", "Checkpoint blocks by tier and state.",
                                   labels=["tier", "state"])
        nbytes = GaugeMetricFamily(P + "checkpoint_bytes", "Bytes of checkpoint blocks by tier and state.",
                                   labels=["tier", "state"])
        for (tier, state), n in e.blocks.items():
            blocks.add_metric([tier, state], n)
            nbytes.add_metric([tier, state], n * e.block_nbytes)
        yield blocks
        yield nbytes
        yield _gauge("cached_checkpoints", "Segment checkpoints held on the device (in use or cached for reuse).",
                     e.blocks["device", "used"] + e.blocks["device", "cached"])
        yield _counter("prefix_cache_queries", "Prompt tokens looked up for prefix reuse.", e.prefix_query_tokens)
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", e.prefix_hit_tokens)
        evictions = CounterMetricFamily(P + "evictions", "Evictions by kind.", labels=["kind"])
        evictions.add_metric(["checkpoint_block"], e.block_evictions)
        swaps = CounterMetricFamily(P + "preemptions", "Preempted requests by how.", labels=["kind"])
        swaps.add_metric(["swap_out"], e.num_swapped_out)
        swaps.add_metric(["swap_in"], e.num_swapped_in)
        swaps.add_metric(["recompute"], e.num_recomputed)
        store = self.engine.engine.sessions
        if store is not None:
            yield from store_metrics(store.snapshot(), evictions)
        yield evictions
        yield swaps


def store_metrics(s: StoreStatsSnapshot, evictions: CounterMetricFamily):
    """The session store: sessions and bytes by tier, the store's physical and logical bytes
    (their ratio is what sharing blocks saves), blocks, writes, integrity errors, collection."""
    backend = s.backend
    evictions.add_metric(["session_memory"], s.evictions["memory"])
    evictions.add_metric(["session_store"], s.evictions["store"])
    by_tier = GaugeMetricFamily(P + "sessions", "Saved sessions by tier (memory: cached in this process).",
                                labels=["tier"])
    bytes_by_tier = GaugeMetricFamily(P + "session_bytes", "Bytes of saved sessions by tier.", labels=["tier"])
    for tier in ("memory", "store"):
        by_tier.add_metric([tier], s.sessions[tier])
        bytes_by_tier.add_metric([tier], s.session_bytes[tier])
    yield by_tier
    yield bytes_by_tier
    physical, logical = s.physical_bytes, s.logical_bytes
    store_bytes = GaugeMetricFamily(P + "session_store_bytes", "Bytes in the session store: physical (each "
                                    "shared block once) and logical (as if nothing were shared).",
                                    labels=["backend", "kind"])
    store_bytes.add_metric([backend, "physical"], physical)
    store_bytes.add_metric([backend, "logical"], logical)
    yield store_bytes
    yield _gauge("session_store_dedup_ratio", "Logical over physical bytes of the session store.",
                 logical / physical if physical else 1.0, backend=backend)
    blobs = GaugeMetricFamily(P + "session_store_blobs", "Blobs in the session store.", labels=["backend", "kind"])
    for kind in ("block", "slot"):
        blobs.add_metric([backend, kind], s.blobs[kind])
    yield blobs
    yield _counter("session_store_written_bytes", "Bytes this server wrote to the session store.",
                   s.bytes_written, backend=backend)
    collected = CounterMetricFamily(P + "session_store_collected", "Unreferenced blobs collected.", labels=["kind"])
    collected.add_metric(["block"], s.blocks_collected)
    collected.add_metric(["slot"], s.slots_collected)
    yield collected
    integrity = CounterMetricFamily(P + "session_store_integrity_errors", "Stored blocks, slots or manifests that "
                                    "failed their checks (the session resumed from its last good checkpoint).",
                                    labels=["kind"])
    for kind in ("missing", "truncated", "checksum", "format", "mismatch"):
        integrity.add_metric([kind], s.integrity_errors.get(kind, 0))
    yield integrity
    yield _counter("session_write_errors", "Session turns that could not be saved.", s.write_errors)
    hist = HistogramMetricFamily(P + "session_store_write_seconds", "Time to make one session turn durable "
                                 "(its blocks, slot and manifest).", labels=["backend"])
    cumulative, buckets = 0, []
    for bound, n in zip((*WRITE_BUCKETS, float("inf")), s.write_seconds):
        cumulative += n
        buckets.append((floatToGoString(bound), cumulative))
    hist.add_metric([backend], buckets, s.write_seconds_sum)
    yield hist


def _gauge(name, doc, value, **labels):
    g = GaugeMetricFamily(P + name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name, doc, value, **labels):
    c = CounterMetricFamily(P + name, doc, labels=list(labels))
    c.add_metric(list(labels.values()), value)
    return c


class Metrics:
    def __init__(self, engine: AsyncEngine):
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
        """Record one output as it is delivered (from the engine thread, or from the session
        writer's for a turn that waited for its durable save; prometheus_client is thread-safe)."""
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
