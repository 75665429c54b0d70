"""Ray Serve replicas behind the one ingress: a local Ray, 2 CPU replicas of the tiny checkpoint."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import Running, wait_done, wait_for
from zstudio.engine import Generator
from zstudio.params import GenerationParams
from zstudio.server.app import create_app

ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra zstudio[ray]")

from zstudio.server.replicas import ReplicaSpec, start_replicas, warm_key  # noqa: E402

JOB = {"prompt": "a red square", "width": 256, "height": 256, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def runner(tiny_dir, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "zstudio-cache"
    env = {"HF_HUB_OFFLINE": "1", "ZSTUDIO_CACHE": str(cache), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    runner = start_replicas(ReplicaSpec(model=str(tiny_dir), device="cpu", warmup=False), replicas=2)
    yield runner
    runner.stop()
    ray.shutdown()


@pytest.fixture
def ingress(tiny_dir, tmp_path):
    """The ingress's own generator validates and saves; it never loads weights."""
    return Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path / "outputs")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_forty_jobs_spread_over_both_replicas_and_match_one_process(runner, ingress, generator, tmp_path):
    runner.served_by.clear()
    with Running(create_app(ingress, tmp_path / "outputs", ui=False, max_waiting=64, runner=runner)) as client:
        ids = [client.post("/api/v1/generations", json={**JOB, "seed": seed}).json()["id"] for seed in range(40)]
        jobs = [wait_done(client, job_id, timeout=120) for job_id in ids]
    assert [job["status"] for job in jobs] == ["done"] * 40
    assert ingress.pipe is None  # the weights stayed in the replicas
    assert len(runner.served_by) == 2 and sum(runner.served_by.values()) == 40
    assert min(runner.served_by.values()) >= 5, runner.served_by
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas (OMP_NUM_THREADS=1): a CPU sum's order follows its thread count
    try:
        for seed, job in list(enumerate(jobs))[::4]:  # every 4th: single-process generations cost the test's time
            expected = np.asarray(generator.generate_images(GenerationParams(**JOB, seed=seed)).images[0])
            got = pixels(tmp_path / "outputs" / job["outputs"][0])
            assert np.array_equal(got, expected), (seed, np.abs(got.astype(int) - expected).max())
    finally:
        torch.set_num_threads(threads)


def test_killing_a_replica_mid_run_loses_no_accepted_job(runner, ingress, tmp_path):
    slow = {**JOB, "num_inference_steps": 20}
    app = create_app(ingress, tmp_path / "outputs", ui=False, max_waiting=64, runner=runner)
    retried = runner.retried
    with Running(app) as client:
        ids = [client.post("/api/v1/generations", json={**slow, "seed": seed}).json()["id"] for seed in range(8)]
        queue = app.state.studio.queue

        def both_busy() -> bool:  # a step reported: the job is inside its replica, not waiting at the router
            running = list(queue.running_ids)
            return len(running) == 2 and all(queue.jobs[job_id].step >= 1 for job_id in running)

        wait_for(both_busy, timeout=60, what="both replicas running a job")
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        assert len(names) == 2, names
        victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
        ray.kill(victim, no_restart=False)  # as a crash: Ray Serve replaces the replica
        time.sleep(0.5)
        jobs = [wait_done(client, job_id, timeout=180) for job_id in ids]
        health = client.get("/api/v1/health")
    assert [job["status"] for job in jobs] == ["done"] * 8, [job.get("error") for job in jobs]
    assert runner.retried > retried  # the killed replica's job ran again elsewhere
    wait_for(lambda: len([a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]])
             == 2, timeout=90, what="Ray Serve to replace the killed replica")  # fmt: skip
    assert health.status_code == 200


def test_cancel_stops_a_job_inside_its_replica_and_a_full_line_answers_429(runner, ingress, tmp_path):
    long_job = {**JOB, "width": 1024, "height": 1024, "num_inference_steps": 100}  # a minute or more on a CPU replica
    with Running(create_app(ingress, tmp_path / "outputs", ui=False, max_waiting=1, runner=runner)) as client:
        running = [client.post("/api/v1/generations", json={**long_job, "seed": s}).json()["id"] for s in (1, 2)]
        for job_id in running:
            wait_for(lambda job_id=job_id: client.get(f"/api/v1/generations/{job_id}").json()["step"] >= 1,
                     timeout=60, what="a step reported from the replica")  # fmt: skip
        waiting = client.post("/api/v1/generations", json=long_job)
        assert waiting.status_code == 202 and waiting.json()["position"] == 1
        full = client.post("/api/v1/generations", json=long_job)
        assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
        client.delete(f"/api/v1/generations/{waiting.json()['id']}")
        for job_id in running:
            client.delete(f"/api/v1/generations/{job_id}")
        jobs = [wait_done(client, job_id, timeout=60) for job_id in running]
        after = wait_done(client, client.post("/api/v1/generations", json={**JOB, "seed": 3}).json()["id"])
    assert [job["status"] for job in jobs] == ["cancelled", "cancelled"]
    assert all(job["step"] < 100 and job["outputs"] == [] for job in jobs)  # stopped inside the replicas
    assert after["status"] == "done"  # the replicas serve on


def test_warm_key_names_the_lora_set_only():
    assert warm_key(GenerationParams(prompt="x")) == ""
    assert warm_key(GenerationParams(prompt="x <lora:b:0.5> <lora:a:1>")) == "a:1|b:0.5"
