"""/metrics in Prometheus' text format, read from the job queue at scrape time (prometheus-client's collector API)."""

from __future__ import annotations

import statistics

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .jobs import JobQueue


class QueueCollector:
    def __init__(self, queue: JobQueue):
        self.queue = queue

    def collect(self):
        queue = self.queue
        jobs = CounterMetricFamily("zstudio_jobs", "Jobs accepted (queued) and ended, by status.", labels=["status"])
        for state in ("queued", "done", "failed", "cancelled"):
            jobs.add_metric([state], queue.counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("zstudio_queue_length", "Jobs waiting.", value=len(queue.waiting))
        running = int(bool(queue.running))
        yield GaugeMetricFamily("zstudio_job_running", "1 while a job runs on the device.", value=running)
        yield GaugeMetricFamily("zstudio_available", "1 while jobs are accepted (see /api/v1/health).",
                                value=int(queue.unavailable() is None))  # fmt: skip
        yield CounterMetricFamily("zstudio_worker_restarts", "Worker or writer threads restarted by the watchdog.",
                                  value=queue.restarts)  # fmt: skip
        if queue.image_seconds:
            yield GaugeMetricFamily("zstudio_seconds_per_image", "Median seconds per image over the last 200 jobs.",
                                    value=statistics.median(queue.image_seconds))  # fmt: skip
        device = queue.generator.device
        if device.type == "cuda":
            import torch

            yield GaugeMetricFamily("zstudio_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated",
                                    value=torch.cuda.memory_allocated(device))  # fmt: skip
            yield GaugeMetricFamily("zstudio_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved",
                                    value=torch.cuda.memory_reserved(device))  # fmt: skip


def metrics_registry(queue: JobQueue) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(queue))
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
