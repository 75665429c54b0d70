"""Engine replicas on Ray Serve: `zstudio serve --ray` runs one engine per GPU (or per `--gpus-per-replica`), on
this host or a Ray cluster, behind the one ingress process that keeps the API, the queue and the history.

The ingress's job system (`zstudio.server.jobs.JobQueue`) is unchanged: its runner here is `RayRunner`, which gives
the queue one worker thread per replica and sends each job through a Ray Serve handle. Ray Serve routes it (to a
replica with no job running: `max_ongoing_requests=1`), restarts a replica whose process dies (its health check
fails), and streams the job's progress back. A job whose replica died is retried once on another replica; twice
lost, it fails with the reason. Jobs with LoRAs carry their LoRA set as Ray Serve's multiplexed model id, so the
router prefers a replica that last ran the same set (its adapters are warm).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..cancel import cancellable
from ..engine import GenerationCancelled, GenerationResult, ProgressCallback
from ..lora import take_prompt_loras
from ..params import GenerationParams, ParamError

log = logging.getLogger(__name__)
APP_NAME = "zstudio"
RETRIES = 1  # a job whose replica died runs once more; then it fails with the reason
WARM_KEYS_PER_REPLICA = 4


class ReplicaLost(RuntimeError):
    """The replica running a job died (twice, counting the retry)."""


class ReplicaFailed(RuntimeError):
    """The job failed inside its replica; the message is the replica's one-line reason."""


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads: the same arguments as `zstudio.engine.Generator`."""

    model: str | None = None
    dtype: str | None = None
    speed: str | None = None
    memory: str | None = None
    warmup: bool = True
    device: str | None = None  # None: cuda when Ray gave the replica a GPU, else cpu
    factory: str | None = (
        None  # "module:function(device=...)" making the Generator instead (the benchmarks' random one)
    )


def warm_key(params: GenerationParams) -> str:
    """The LoRA set a job needs (names and weights), or "" when it needs none."""
    loras = take_prompt_loras(params).loras
    return "|".join(f"{name}:{weight:g}" for name, weight in sorted(loras))


class EngineReplica:
    """One resident engine in a Ray actor; `generate` streams ("progress", step, total) then the outcome."""

    def __init__(self, spec: ReplicaSpec):
        import ray

        from ..engine import Generator

        device = spec.device or ("cuda" if ray.get_gpu_ids() else "cpu")
        if spec.factory:
            module, _, function = spec.factory.partition(":")
            make = getattr(importlib.import_module(module), function)
            self.generator = make(device=device, speed=spec.speed or "eager")
        else:
            self.generator = Generator(model=spec.model, device=device, dtype=spec.dtype, speed=spec.speed,
                                       memory=spec.memory).load()  # fmt: skip
        self.generator.loras.folder.folder_only = True  # as the ingress: LoRAs of the folder only
        if spec.warmup:
            self.generator.warmup()
        self.pid = os.getpid()
        from ray import serve

        # Ray Serve's model multiplexing, used for warm state: the router prefers replicas that last saw this key.
        self._remember = serve.multiplexed(max_num_models_per_replica=WARM_KEYS_PER_REPLICA)(self._warm)

    async def check_health(self) -> None:
        """Ray Serve calls this; the engine being unusable (a poisoned CUDA context) makes Ray restart us."""
        if self.generator.pipe is None:
            raise RuntimeError("the engine is not loaded")

    async def _warm(self, key: str) -> str:
        return key  # the adapters themselves are loaded by generate_images; this records the set for the router

    async def generate(self, params: dict[str, Any]):
        from ray import serve

        if key := serve.get_multiplexed_model_id():
            await self._remember(key)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def progress(step: int, total: int) -> None:
            if stop.is_set():
                raise GenerationCancelled()
            loop.call_soon_threadsafe(events.put_nowait, ("progress", step, total))

        def work() -> GenerationResult:
            try:
                with cancellable(self.generator.pipe, stop.is_set):
                    return self.generator.generate_images(GenerationParams.from_dict(params), progress=progress)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, done)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while (event := await events.get()) is not done:
                yield event
            try:
                result = await task
            except GenerationCancelled:
                yield ("cancelled",)
            except ParamError as err:
                yield ("param_error", err.field, err.message)
            except Exception as err:
                yield ("failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            else:
                yield ("result", result, self.pid)
        finally:
            stop.set()  # the caller went away (cancel, disconnect): the engine stops at its next block


def replica_died_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError)


class RayRunner:
    """The job queue's runner for replicas: one slot per replica, each job through the deployment handle."""

    def __init__(self, handle: Any, replicas: int, owns_ray: bool = False):
        self.handle = handle
        self.slots = replicas
        self.owns_ray = owns_ray
        self.served_by: dict[int, int] = {}  # replica process id -> jobs finished there (the status / the tests)
        self.retried = 0  # jobs run again after their replica died
        self._lock = threading.Lock()
        self._died = replica_died_errors()

    def run(self, params: GenerationParams, progress: ProgressCallback, cancelled: Callable[[], bool]
            ) -> GenerationResult:  # fmt: skip
        for attempt in range(RETRIES + 1):
            try:
                return self._once(params, progress, cancelled)
            except self._died as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                if attempt == RETRIES:
                    raise ReplicaLost(f"its replica died twice; last: {reason}") from None
                log.warning("a replica died while running a job (%s); running it again on another", reason)
                with self._lock:
                    self.retried += 1
        raise AssertionError("unreachable")

    def _once(self, params: GenerationParams, progress: ProgressCallback, cancelled: Callable[[], bool]
              ) -> GenerationResult:  # fmt: skip
        handle = self.handle.options(stream=True, multiplexed_model_id=warm_key(params))
        response = handle.generate.remote(params.to_dict())
        try:
            for event in response:
                if cancelled():
                    raise GenerationCancelled()
                kind = event[0]
                if kind == "progress":
                    progress(event[1], event[2])
                elif kind == "result":
                    with self._lock:
                        self.served_by[event[2]] = self.served_by.get(event[2], 0) + 1
                    return event[1]
                elif kind == "cancelled":
                    raise GenerationCancelled()
                elif kind == "param_error":
                    raise ParamError(event[1], event[2])
                else:
                    raise ReplicaFailed(event[1])
        except GenerationCancelled:
            response.cancel()
            raise
        raise ReplicaFailed("the replica ended the job without a result")

    def unavailable(self) -> str | None:
        return None  # Ray Serve holds requests while it restarts a replica

    def stop(self) -> None:
        """Delete the replicas (and the local Ray this runner started); the server calls it once it has stopped."""
        from ray import serve

        try:
            serve.delete(APP_NAME)
        except Exception as err:  # shutting down: say it and go on
            log.warning("could not delete the Ray Serve app: %s", err)
        if self.owns_ray:
            import ray

            ray.shutdown()


def start_replicas(spec: ReplicaSpec, replicas: int | None = None, gpus_per_replica: float = 1.0,
                   address: str | None = None, cpus_per_replica: float = 1.0) -> RayRunner:  # fmt: skip
    """Connect to (`address`, e.g. "auto") or start a local Ray, deploy the replicas, wait until they are up.

    `replicas` defaults to the cluster's GPUs / `gpus_per_replica`, or 1 without GPUs."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ParamError("ray", "needs Ray Serve: pip install 'zstudio[ray]'") from None
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus == 0:
        gpus_per_replica = 0
    if replicas is None:
        replicas = max(1, int(gpus // gpus_per_replica)) if gpus_per_replica else 1
    if replicas < 1:
        raise ParamError("replicas", f"is {replicas}; use 1 or more")
    if gpus_per_replica and replicas * gpus_per_replica > gpus:
        raise ParamError("replicas", f"{replicas} x {gpus_per_replica:g} GPUs is more than the cluster's {gpus:g}")
    deployment = serve.deployment(
        EngineReplica,
        num_replicas=replicas,
        max_ongoing_requests=1,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    serve.start(proxy_location="Disabled")  # the ingress is zstudio's own server
    handle = serve.run(deployment.bind(spec), name=APP_NAME, route_prefix=None)
    log.warning("Ray Serve: %d engine replica(s), %g GPU(s) each", replicas, gpus_per_replica)
    return RayRunner(handle, replicas, owns_ray=owns)
