"""Multi-process training for real: the README's multi-host command as two processes on
127.0.0.1 (two forced CPU devices each), against one process with the same four devices.

One module fixture launches every run once, the tests read what they left behind:

- ``one``: 1 process x 4 devices, steps 1-9, uninterrupted (the reference).
- ``two``: 2 processes x 2 devices (explicit coordinator flags), SIGKILLed together once the
  step-6 checkpoint is committed; ``resumed``: the same command relaunched, steps 7-9.
- ``moved``: a copy of ``two``'s workdir at the kill, resumed by 1 process x 4 devices.
- ``lose1`` / ``lose0``: two 2-process jobs (explicit flags; SLURM's environment with
  ``--multihost``) where process 1 / the coordinator is SIGKILLed: the survivor must exit
  non-zero with a clear message within the heartbeat timeout.

Every subprocess runs under a deadline, so a regression (a deadlock) fails instead of
hanging CI. Compiled programs go to a per-module persistent compilation cache: relaunches
of the same program skip most of the compiling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from train_config import logged_losses as _losses

from panns_jax import checkpoints

# Several minutes of two-process runs: deselected from the README's suite, run by .ci/run
# (`-m slow tests/test_multihost.py`).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 9, 6, 3  # tests/train_config.py checkpoints every 3.
HEARTBEAT_S = 10  # --heartbeat_timeout_s of the multi-process runs.
LAUNCH_TIMEOUT_S = 900  # Per launch: a deadlock fails the test instead of hanging CI.
EPS32 = float(np.finfo(np.float32).eps)
DEAD_PEER = (
    "Terminating process because the JAX distributed service detected fatal errors",
    "error: process ",
)


def _loss_tolerance(step: int, loss: float) -> float:
    """What float32 round-off can make two runs of the same global batches disagree by.

    Both runs execute the same per-device programs on the same rows; only the order in
    which the cross-device sums (gradients, BatchNorm statistics, the loss: 4 partial sums)
    are added differs (gloo between processes, in-process otherwise). Reordering a sum of
    4 terms moves it by at most 3 roundings, ~2 eps relative to the sum of magnitudes;
    the forward pass, the backward pass, the BatchNorm statistics and the Adam moments each
    carry such a perturbation into the next step, so we allow 4 x 4 eps relative per step,
    accumulated linearly over the steps: 16 * eps * step * |loss| (1.4e-5 relative at step
    9). Measured on this machine: at most ~2 eps at any step. A different batch (one clip
    of 8 changed) moves the loss by ~1e-2: any data-order bug is far outside.
    """
    return 16 * EPS32 * step * abs(loss)


def _free_port(low: int = 20000, high: int = 60000) -> int:
    rng = np.random.default_rng()
    for _ in range(200):
        port = int(rng.integers(low, high))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _env(devices: int, cache: str) -> dict:
    drop = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


class Job:
    """One launch of the training command: 1 process, or the processes of one job."""

    def __init__(
        self,
        name: str,
        workdir: str,
        data_dir: str,
        cache: str,
        *,
        processes: int,
        devices: int,
        slurm: bool = False,
    ):
        self.name, self.workdir, self.procs, self.logs = name, workdir, [], []
        logs = os.path.join(os.path.dirname(workdir), "logs")
        os.makedirs(logs, exist_ok=True)
        # SLURM derives the coordinator port from the job id: 61440 + id % 4096.
        port = _free_port(61440, 65535) if slurm else _free_port()
        for i in range(processes):
            env = _env(devices, cache)
            cmd = [
                sys.executable,
                "-m",
                "panns_jax.main",
                f"--config={ROOT}/tests/train_config.py",
                f"--workdir={workdir}",
                f"--config.data_dir={data_dir}",
                f"--config.num_train_steps={STEPS}",
                f"--config.eval_every={EVAL_EVERY}",
            ]
            if processes > 1:
                cmd.append(f"--heartbeat_timeout_s={HEARTBEAT_S}")
                if slurm:  # What srun gives each task (launch/slurm.sbatch).
                    cmd.append("--multihost")
                    env.update(
                        SLURM_JOB_ID=str(port - 61440),
                        SLURM_STEP_NODELIST="localhost",
                        SLURM_NTASKS=str(processes),
                        SLURM_PROCID=str(i),
                        SLURM_LOCALID=str(i),
                    )
                else:  # The README's plain coordinator flags.
                    cmd += [
                        f"--coordinator_address=127.0.0.1:{port}",
                        f"--num_processes={processes}",
                        f"--process_id={i}",
                    ]
                    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
            log = os.path.join(logs, f"{name}.{i}.log")
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            self.logs.append(log)
        self.started = time.monotonic()
        self.deadline = self.started + LAUNCH_TIMEOUT_S

    def text(self, i: int) -> str:
        with open(self.logs[i], errors="replace") as f:
            return f.read()

    def tails(self) -> str:
        return "\n".join(
            f"--- {self.name} process {i} ---\n{self.text(i)[-4000:]}"
            for i in range(len(self.procs))
        )

    def kill(self, *which: int) -> None:
        for i in which or range(len(self.procs)):
            if self.procs[i].poll() is None:
                self.procs[i].send_signal(signal.SIGKILL)
            self.procs[i].wait()

    def fail(self, why: str) -> None:
        self.kill()
        pytest.fail(f"{self.name}: {why}\n{self.tails()}")

    def wait_until(self, condition) -> None:
        while not condition():
            if any(p.poll() is not None for p in self.procs):
                self.fail("a process exited early")
            if time.monotonic() > self.deadline:
                self.fail(f"not done within {LAUNCH_TIMEOUT_S} s (deadlock?)")
            time.sleep(0.1)

    def wait(self, *which: int) -> list:
        for i in which or range(len(self.procs)):
            try:
                self.procs[i].wait(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.fail(f"process {i} still running after {LAUNCH_TIMEOUT_S} s (deadlock?)")
        return [p.returncode for p in self.procs]

    def succeed(self) -> float:
        if any(code != 0 for code in self.wait()):
            self.fail(f"exit codes {[p.returncode for p in self.procs]}")
        return time.monotonic() - self.started


def _shards(text: str) -> tuple:
    """(first row, last row, global batch, eval records first..last, count) from the log."""
    found = re.search(
        r"reads rows (\d+)\.\.(\d+) of each global batch of (\d+) .*eval records "
        r"(\d+)\.\.(\d+) \((\d+) of them\)",
        text,
    )
    assert found, "no shard line in the log"
    return tuple(int(g) for g in found.groups())


@pytest.fixture(scope="module")
def runs(panns_demo_dir, tmp_path_factory):
    from panns_jax import data

    data.get_builder("panns_demo", data_dir=str(panns_demo_dir))  # Prepared once, shared.
    base = str(tmp_path_factory.mktemp("multihost"))
    cache = os.path.join(base, "xla_cache")
    d = str(panns_demo_dir)
    path = lambda name: os.path.join(base, name)  # noqa: E731
    r = types.SimpleNamespace(jobs=[], seconds={})

    def launch(name, workdir=None, **kw):
        job = Job(name, path(workdir or name), d, cache, **kw)
        r.jobs.append(job)
        return job

    try:
        t = time.monotonic()
        r.one = launch("one", processes=1, devices=4)
        r.two = launch("two", processes=2, devices=2)
        committed = os.path.join(path("two"), "checkpoints", "6", "_CHECKPOINT_METADATA")
        r.two.wait_until(lambda: os.path.exists(committed))
        r.two.kill()  # SIGKILL, all processes, mid-run (steps 7-9 and two evals to go).
        r.killed_losses = _losses(path("two"))
        shutil.copytree(path("two"), path("moved"))
        r.seconds["two until killed"] = time.monotonic() - t
        r.resumed = launch("resumed", "two", processes=2, devices=2)  # Same command again.
        r.moved = launch("moved", processes=1, devices=4)
        r.seconds["one"] = r.one.succeed()
        r.seconds["resumed"] = r.resumed.succeed()
        r.seconds["moved"] = r.moved.succeed()

        # One process of a job dies: the other must notice and exit, not hang.
        r.lose1 = launch("lose1", processes=2, devices=2)
        r.lose0 = launch("lose0", processes=2, devices=2, slurm=True)
        r.survivor_seconds = {}
        for job, victim, survivor in ((r.lose1, 1, 0), (r.lose0, 0, 1)):
            joined = re.compile(r"process \d/2, \d+ local / 4 global devices")
            job.wait_until(
                lambda job=job, joined=joined: all(joined.search(job.text(i)) for i in range(2))
            )
            job.kill(victim)
            killed = time.monotonic()
            job.wait(survivor)
            r.survivor_seconds[job.name] = time.monotonic() - killed
        r.seconds["total"] = time.monotonic() - t
        print(
            "multihost timings (s):",
            {k: round(v) for k, v in r.seconds.items()},
            {k: round(v, 1) for k, v in r.survivor_seconds.items()},
        )
        yield r
    finally:
        for job in r.jobs:
            job.kill()


def test_two_processes_give_the_losses_of_one_process_step_by_step(runs):
    want = _losses(runs.one.workdir)
    got = dict(runs.killed_losses)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert 1 in got, "the 2-process run was killed before its first step"
    got.update(_losses(runs.resumed.workdir))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= _loss_tolerance(step, want[step]), (
            step,
            got[step],
            want[step],
        )


def test_each_host_reads_its_own_rows_and_eval_records(runs):
    first, last, batch, e0, e1, n = _shards(runs.one.text(0))
    assert (first, last, batch, e0, e1, n) == (0, batch - 1, 8, 0, 99, 100)
    hosts = [_shards(runs.two.text(i)) for i in range(2)]
    # Host h reads rows h*4 .. h*4+3 of every global batch of 8 (train_config: 4 clips with
    # mixup pairs) and its own contiguous half of the eval split: disjoint, covering.
    assert [(h[0], h[1], h[2]) for h in hosts] == [(0, 3, 8), (4, 7, 8)]
    assert [(h[3], h[4], h[5]) for h in hosts] == [(0, 49, 50), (50, 99, 50)]


def test_evaluation_counts_every_example_once(runs):
    for job in (runs.one, runs.two, runs.resumed):
        for i in range(len(job.procs)):
            counts = re.findall(r"eval at step (\d+) over (\d+) examples", job.text(i))
            assert counts, f"{job.name} process {i} logged no evaluation"
            assert {int(n) for _, n in counts} == {100}, counts
    # At step 0 the weights are the same bits in both runs, and so are the scores: the
    # per-class AP (over all gathered examples) must be identical, not just close.
    step0 = os.path.join("eval", "per_class_step00000000.csv")
    with (
        open(os.path.join(runs.one.workdir, step0)) as a,
        open(os.path.join(runs.two.workdir, step0)) as b,
    ):
        assert a.read() == b.read()


def test_checkpoints_are_written_once_by_process_zero(runs):
    assert "wrote best (step 0)" in runs.two.text(0)  # Every process joins the first export.
    assert f"wrote model (step {STEPS})" in runs.resumed.text(0)
    for job in (runs.two, runs.resumed):
        assert "wrote " not in job.text(1), "process 1 must not write model checkpoints"
    workdir = runs.resumed.workdir
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["3", "6", "9"]
    leftovers = [n for n in os.listdir(workdir) if n.startswith(".")]
    assert leftovers == [], leftovers  # No staging copy of 'best' or 'model' left behind.
    model = checkpoints.load(os.path.join(workdir, "model"))  # Digest-checked.
    assert model.step == STEPS and model.model == "Cnn10"
    best = checkpoints.load(os.path.join(workdir, "best"))
    with open(os.path.join(workdir, "best", "best_map.json")) as f:
        score = json.load(f)
    assert score["step"] == best.step and best.extra.get("mAP") == score["mAP"]


def test_checkpoint_restores_onto_two_processes_and_onto_one(runs):
    want = _losses(runs.one.workdir)
    for job in (runs.resumed, runs.moved):
        assert "resumed from step 6" in job.text(0), job.name
        got = _losses(job.workdir)
        for step in range(7, STEPS + 1):
            assert abs(got[step] - want[step]) <= _loss_tolerance(step, want[step]), (
                job.name,
                step,
                got[step],
                want[step],
            )


def test_a_process_that_loses_its_peer_exits_with_a_clear_error(runs):
    for job, survivor in ((runs.lose1, 0), (runs.lose0, 1)):
        code = job.procs[survivor].returncode
        assert code != 0, f"{job.name}: the survivor exited 0"
        text = job.text(survivor)
        assert any(m in text for m in DEAD_PEER), f"{job.name}: no clear message\n{text[-3000:]}"
        # The heartbeat timeout bounds it; the slack covers a loaded machine.
        assert runs.survivor_seconds[job.name] < HEARTBEAT_S + 60, runs.survivor_seconds
