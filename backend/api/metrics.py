"""Prometheus metrics: request counts and latency by route, jobs by status (read at scrape time), inference."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.db.models import JOB_STATUSES, Job


class JobStatusCollector(Collector):
    """`safetrain_jobs{status=…}`: how many jobs are in each status now."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("safetrain_jobs", "Jobs by status.", labels=["status"])
        try:
            with self.session_factory() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
        except Exception:
            return  # the database is down: /readyz says so; the scrape still answers
        for status in JOB_STATUSES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


class Metrics:
    """The app's own registry (several apps in one process never collide)."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "safetrain_http_requests", "HTTP requests.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "safetrain_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.inference_requests = Counter(
            "safetrain_inference_requests", "Chat and completion requests by route and status.", ["route", "status"],
            registry=self.registry,
        )
        self.inference_tokens = Counter(
            "safetrain_inference_generated_tokens", "Tokens generated for chat and completion answers.",
            registry=self.registry,
        )
        self.inference_first_token = Histogram(
            "safetrain_inference_time_to_first_token_seconds", "From the request to the first generated token.",
            registry=self.registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
        )
        self.registry.register(JobStatusCollector(session_factory))


class MetricsMiddleware:
    """Counts and times each request under its route template (`/v1/files/{file_id}`), not the raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status[0])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
