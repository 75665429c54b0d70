"""/metrics in Prometheus' text format: the queue's state read at scrape time (prometheus-client's collector API),
and histograms of seconds per image and of the wait in the queue, observed as jobs start and finish."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
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
        running = len(queue.running_ids)
        yield GaugeMetricFamily("zstudio_job_running", "Jobs running (one per engine replica at most).", value=running)
        yield GaugeMetricFamily("zstudio_available", "1 while jobs are accepted (see /api/v1/health).",
                                value=int(queue.unavailable() is None))  # fmt: skip
        yield CounterMetricFamily("zstudio_worker_restarts", "Worker or writer threads restarted by the watchdog.",
                                  value=queue.restarts)  # fmt: skip
        device = queue.generator.device
        if device.type == "cuda":
            import torch

            yield GaugeMetricFamily("zstudio_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated",
                                    value=torch.cuda.memory_allocated(device))  # fmt: skip
            yield GaugeMetricFamily("zstudio_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved",
                                    value=torch.cuda.memory_reserved(device))  # fmt: skip


IMAGE_BUCKETS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300)
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800)


def metrics_registry(queue: JobQueue) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(queue))
    histograms = {
        "image": Histogram("zstudio_seconds_per_image", "Engine seconds per image of finished jobs.",
                           buckets=IMAGE_BUCKETS, registry=registry),
        "queue_wait": Histogram("zstudio_queue_wait_seconds", "Seconds from acceptance to start, per job.",
                                buckets=WAIT_BUCKETS, registry=registry),
    }  # fmt: skip
    queue.observers.append(lambda what, seconds: histograms[what].observe(seconds))
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
