"""Prometheus metrics of ``barkgpt serve`` (``GET /metrics``): :class:`ServerMetrics`, one
registry per app, and :class:`CountRequests`, the outermost ASGI middleware that counts every
response by route and status (401s and 413s from the :class:`~barkgpt.server.security.Guard`
included). Names follow vLLM's ``vllm:*`` metrics with a ``barkgpt_`` prefix.
"""

from __future__ import annotations


class ServerMetrics:
    """Prometheus metrics of one app, in their own registry (``GET /metrics``, text format).

    Requests by route and status, prompt and generated tokens, time to first token and
    inter-token latency (seconds), running/waiting requests, and the prefix cache's prompt
    tokens looked up, tokens reused, hit rate (reused / looked up) and tokens held (read from
    the scheduler when scraped). Names follow vLLM's ``vllm:*`` metrics with a ``barkgpt_`` prefix.

    Args:
        running: a zero-argument callable giving the requests decoding now.
        waiting: a zero-argument callable giving the requests queued for a row.
        prefix_cache: a zero-argument callable giving the served engine's
            :class:`~barkgpt.engine.PrefixCache`, or None (off, or no model yet).
    """

    ROUTES = {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/generate",
        "/tokenize",
        "/detokenize",
    }

    def __init__(self, running, waiting, prefix_cache=lambda: None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("barkgpt_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("barkgpt_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("barkgpt_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram(
            "barkgpt_time_to_first_token_seconds",
            "request arrival to first token",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.itl = Histogram(
            "barkgpt_inter_token_latency_seconds",
            "time between two tokens of a request",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        Gauge("barkgpt_requests_running", "requests in the decode batch", registry=r).set_function(running)
        Gauge("barkgpt_requests_waiting", "requests queued for the decode batch", registry=r).set_function(waiting)

        def stat(fn):
            """A gauge callable: ``fn`` of the current prefix cache, 0 without one."""
            return lambda: fn(prefix_cache()) if prefix_cache() is not None else 0

        Gauge("barkgpt_prefix_cache_queries", "prompt tokens looked up in the prefix cache", registry=r).set_function(
            stat(lambda c: c.queries)
        )
        Gauge(
            "barkgpt_prefix_cache_hits", "prompt tokens reused from the prefix cache instead of prefilled", registry=r
        ).set_function(stat(lambda c: c.hits))
        Gauge("barkgpt_prefix_cache_hit_rate", "prefix cache hits / queries (tokens)", registry=r).set_function(
            stat(lambda c: c.hits / c.queries if c.queries else 0.0)
        )
        Gauge("barkgpt_prefix_cache_tokens", "tokens held in the prefix cache", registry=r).set_function(stat(lambda c: c.tokens))

    def route(self, path: str) -> str:
        """A bounded route label: known routes as is, ``/v1/models/{id}``, else ``other``."""
        if path in self.ROUTES:
            return path
        return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware (outermost): counts every response by route and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(self.metrics.route(scope["path"]), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
