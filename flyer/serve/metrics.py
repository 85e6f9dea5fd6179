"""Prometheus metrics of one server: the engine's (``ServeMetrics``, in the engine's process) and the
HTTP side's (``ApiMetrics``), each in a registry of its own (servers in one process stay apart);
``GET /metrics`` serves both texts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """Requests, tokens in and out, time to first token, time per output token, scheduler steps' durations,
    running and waiting requests, cache blocks used and free, prefix hit rate, preemptions, MTP drafts
    verified and accepted, steps the batch cutoff ran without drafts."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("flyer_requests", "Requests finished, by finish reason (stop, length, cancelled; "
                                "failed: error, grammar; shutdown)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("flyer_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("flyer_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("flyer_time_to_first_token_seconds", "Submission to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("flyer_time_per_output_token_seconds", "Time between a request's tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)
        # its sum over a stretch of wall time: the share the engine was busy (the rest it waited for requests)
        self.step_seconds = Histogram("flyer_step_seconds", "Scheduler steps (admission, one forward, sampling)",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.running = Gauge("flyer_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("flyer_requests_waiting", "Requests waiting for admission", registry=r)
        self.blocks_used = Gauge("flyer_cache_blocks_used", "Paged cache blocks referenced", registry=r)
        self.blocks_free = Gauge("flyer_cache_blocks_free", "Paged cache blocks free or cached unreferenced",
                                 registry=r)
        self.prefix_hit_rate = Gauge("flyer_prefix_cache_hit_rate",
                                     "Prompt blocks shared or loaded (memory or disk tier) / full prompt blocks",
                                     registry=r)
        self.preemptions = Counter("flyer_preemptions", "Running requests preempted (recomputed later)", registry=r)
        self.draft_tokens = Counter("flyer_spec_draft_tokens", "MTP draft tokens verified (--speculative)",
                                    registry=r)
        self.accepted_tokens = Counter("flyer_spec_accepted_tokens", "MTP draft tokens accepted (--speculative)",
                                       registry=r)
        self.spec_off_steps = Counter("flyer_spec_off_steps", "Steps whose decoding rows outnumbered "
                                      "--speculative-max-batch: none drafted", registry=r)
        self.fixed_steps = Counter("flyer_fixed_shape_steps", "Steps in fixed shapes (--cuda-graphs), by how "
                                   "they ran: replayed from a CUDA graph, or eagerly", ["how"], registry=r)
        self.cuda_graphs = Gauge("flyer_cuda_graphs", "CUDA graphs captured (one per row and slot bucket used)",
                                 registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class ApiMetrics:
    """Requests the HTTP side refused, by status."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.rejected = Counter("flyer_rejected_requests", "Requests refused, by HTTP status", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
