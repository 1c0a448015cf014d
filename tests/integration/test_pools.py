"""Per-state worker pools: a state's ``queue=`` routes it, ``-Q`` picks what a worker
serves, and a run moves between pools as it changes state."""

from __future__ import annotations

from pathlib import Path

from leaseflow.settings import Settings
from tests.helpers import WorkerProcess, processes
from tests.workflows import pools


def test_each_state_runs_only_in_its_pool(settings: Settings, client, tmp_path: Path):
    mixed = settings.model_copy(update={"workflows": ["tests.workflows.pools"]})
    cpu = WorkerProcess(mixed, tmp_path, name="cpu", concurrency=2)
    # Every process shares LEASEFLOW_DEFAULT_QUEUE (where states without queue= go);
    # -Q picks the queues a worker serves, as `leaseflow worker -Q lf-test-gpu` does.
    gpu = WorkerProcess(mixed, tmp_path, name="gpu", extra_args=("-Q", pools.GPU))
    with processes(cpu, gpu):
        cpu.wait_ready()
        gpu.wait_ready()
        runs = [client.start(pools.pooled) for _ in range(10)]
        done = [client.wait_for(run_id, 60) for run_id in runs]
        where = {"cpu": set(cpu.worker_ids()), "gpu": set(gpu.worker_ids())}

    for run in done:
        assert run.status == "completed"
        for step in run.steps:
            pool = "gpu" if step.state == "infer" else "cpu"
            assert step.worker in where[pool], (step.state, step.worker, where)
