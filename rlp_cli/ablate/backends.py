"""Grids on engines users already run: each phase of a job becomes a Ray task or a Slurm job.

Both backends start exactly the command the local backend would (`rlp train ...`, `rlp eval ...`), on
whichever node the engine picks, so the results folder must be on storage every node sees (as it is on
a Slurm cluster's shared file system). The folder stays the single source of truth: a run in progress
holds a lease (its lease.json, refreshed while it trains), so a re-run of `rlp ablate` after the driver
was killed skips it instead of starting it twice, and resumes everything else.

    --backend ray     each phase a Ray task with --cpus-per-run / --gpus-per-run; --ray-address joins a
                      cluster, by default a local Ray is started on 127.0.0.1 with no dashboard.
    --backend slurm   each phase a Slurm job through submitit (partition, GPUs, time limit); the first
                      phases of a grid go out as one job array. --slurm-executor local runs the same
                      jobs with submitit's local executor (no cluster needed: how the tests run it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rlp_cli.ablate.scheduler import TERMINATE_GRACE_S, Job, _die_with_parent, _thread_env, group_env
from rlp_cli.errors import UserError
from rlp_cli.runfolder import RunFolder


def run_phase(argv: list[str], env: dict[str, str], log: str) -> int:
    """What a Ray task or a Slurm job runs: one `rlp` command, its output appended to the run's log.

    Stopping the task (ray.cancel, scancel, submitit's cancel: KeyboardInterrupt or SIGTERM here) stops the
    command the way the local backend does (SIGINT, then SIGTERM, then SIGKILL), so the run is marked
    `interrupted` and stays resumable.
    """
    argv = [sys.executable] + argv[1:]  # this node's Python, not the driver's path
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM (scancel) and SIGINT (ray.cancel, submitit's local cancel; a worker started in the background
    # of a script inherits it ignored) both stop the command cleanly
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    with open(log, "a") as fh:
        fh.write(f"\n=== rlp ablate on {os.uname().nodename}: {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            while True:
                try:
                    return proc.wait(timeout=0.5)  # short waits: an interrupt is seen within half a second
                except subprocess.TimeoutExpired:
                    continue
        except KeyboardInterrupt:
            for sig, grace in ((signal.SIGINT, TERMINATE_GRACE_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def phase_env(cpus: int) -> dict[str, str]:
    return _thread_env(max(1, cpus))


# ---------------------------------------------------------------------------------------------
# Ray


class RayBackend:
    """Each phase a Ray task holding --cpus-per-run CPUs and --gpus-per-run GPUs (Ray sets CUDA_VISIBLE_DEVICES)."""

    def __init__(self, address: str | None, cpus_per_run: int, gpus_per_run: int, dashboard: bool = False):
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray. Fix: pip install 'rlp-cli[ray]' (or pip install ray).") from None
        self.ray = ray
        self.cpus, self.gpus = cpus_per_run, gpus_per_run
        self.started_here = not ray.is_initialized()
        if self.started_here:
            if address:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            else:  # a private Ray for this grid: loopback only, no dashboard unless asked for
                from rlp_cli.ablate.scheduler import cpu_count, visible_gpus

                ray.init(num_cpus=cpu_count(), num_gpus=len(visible_gpus()), include_dashboard=dashboard,
                         _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
        self.address = address or "a local Ray on 127.0.0.1"
        self.task = ray.remote(run_phase)
        self.tasks: dict[Job, object] = {}

    def describe(self) -> str:
        return f"ray: {self.address}; each run {self.cpus} CPU(s), {self.gpus} GPU(s)"

    def has_room(self) -> bool:
        return True  # Ray queues the tasks until their resources are free

    def submit(self, job: Job, phase: str, argv: list[str]) -> str:
        log = RunFolder(job.folder).log(phase)
        self.tasks[job] = self.task.options(num_cpus=self.cpus, num_gpus=self.gpus, name=f"rlp {phase} {job.name}",
                                            max_retries=0).remote(argv, phase_env(self.cpus) | group_env(job), str(log))
        return "ray"

    def poll(self) -> list[tuple[Job, int]]:
        ready, _ = self._wait(list(self.tasks.values()), timeout=0)
        ended = []
        for job, ref in list(self.tasks.items()):
            if ref in ready:
                del self.tasks[job]
                ended.append((job, self._exit_code(job, ref)))
        return ended

    def _exit_code(self, job: Job, ref) -> int:
        try:
            return int(self.ray.get(ref))
        except Exception as e:  # the task itself died (a lost node, a cancel): the run stays resumable
            with open(RunFolder(job.folder).log(job.state), "a") as fh:
                fh.write(f"\n=== the Ray task ended without an exit code: {type(e).__name__}: {e}\n")
            return 1

    def release(self, job: Job) -> None:
        pass

    def where(self, job: Job) -> str:
        return "ray" if job in self.tasks else ""

    def running(self) -> bool:
        return bool(self.tasks)

    def stop(self) -> list[Job]:
        """Cancel only the tasks still running: Ray (2.60) aborts the driver ("Tried to complete task that was not
        pending") when a task is force-cancelled as its reply arrives, so a finished task is left alone."""
        jobs = list(self.tasks)
        _, running = self._wait(list(self.tasks.values()), timeout=0)
        for ref in running:
            self.ray.cancel(ref, force=False)  # KeyboardInterrupt in run_phase: the command is stopped cleanly
        _, stuck = self._wait(running, timeout=TERMINATE_GRACE_S + 15)
        self._force_cancel(stuck)
        self.tasks.clear()
        return jobs

    def kill(self) -> None:
        self._force_cancel(self._wait(list(self.tasks.values()), timeout=0)[1])

    def _wait(self, refs: list, timeout: float) -> tuple[list, list]:
        """(ended, still running) among refs after at most `timeout` seconds."""
        return self.ray.wait(refs, num_returns=len(refs), timeout=timeout)

    def _force_cancel(self, refs) -> None:
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Slurm, through submitit


class SlurmBackend:
    """Each phase a Slurm job; phases submitted together (the first of every run) go out as one job array."""

    def __init__(self, log_dir: Path, *, executor: str, partition: str | None, cpus_per_run: int, gpus_per_run: int,
                 time_min: int, array_parallelism: int | None):
        try:
            import submitit
        except ImportError:
            raise UserError("--backend slurm needs submitit. Fix: pip install 'rlp-cli[slurm]' "
                            "(or pip install submitit).") from None
        if executor not in ("slurm", "local"):
            raise UserError(f"--slurm-executor {executor}: expected slurm or local.")
        self.executor = submitit.AutoExecutor(folder=str(log_dir), cluster=executor)
        params = dict(name="rlp", timeout_min=time_min, cpus_per_task=cpus_per_run, gpus_per_node=gpus_per_run,
                      tasks_per_node=1, nodes=1)
        if executor == "slurm":
            params.update(slurm_partition=partition, slurm_array_parallelism=array_parallelism or 256)
            params = {k: v for k, v in params.items() if v is not None}
        self.executor.update_parameters(**params)
        self.kind, self.cpus, self.gpus, self.partition = executor, cpus_per_run, gpus_per_run, partition
        self.pending: list[tuple[Job, list[str], str]] = []
        self.jobs: dict[Job, object] = {}

    def describe(self) -> str:
        where = "submitit's local executor" if self.kind == "local" else f"Slurm partition {self.partition or '(default)'}"
        return f"slurm: {where}; each run {self.cpus} CPU(s), {self.gpus} GPU(s); job arrays"

    def has_room(self) -> bool:
        return True  # Slurm queues the jobs

    def submit(self, job: Job, phase: str, argv: list[str]) -> str:
        self.pending.append((job, argv, str(RunFolder(job.folder).log(phase))))
        return "slurm (queued)"

    def _flush(self) -> None:
        """Everything submitted since the last poll goes out as one job array."""
        if not self.pending:
            return
        env = phase_env(self.cpus)
        if len(self.pending) == 1:
            job, argv, log = self.pending[0]
            self.jobs[job] = self.executor.submit(run_phase, argv, env | group_env(job), log)
        else:
            with self.executor.batch():
                submitted = [(job, self.executor.submit(run_phase, argv, env | group_env(job), log))
                             for job, argv, log in self.pending]
            self.jobs.update(submitted)
        self.pending = []  # only once submitted: a refused submission stays pending (and is reported)

    def poll(self) -> list[tuple[Job, int]]:
        self._flush()
        ended = []
        for job, sj in list(self.jobs.items()):
            if sj.done():
                del self.jobs[job]
                try:
                    rc = int(sj.result())
                except Exception as e:  # cancelled, timed out, node failure: the run stays resumable
                    with open(RunFolder(job.folder).log(job.state), "a") as fh:
                        fh.write(f"\n=== Slurm job {sj.job_id} ended without an exit code: {type(e).__name__}: "
                                 f"{str(e)[-2000:]}\n")
                    rc = 1
                ended.append((job, rc))
        return ended

    def release(self, job: Job) -> None:
        pass

    def where(self, job: Job) -> str:
        sj = self.jobs.get(job)
        return f"slurm {sj.job_id}" if sj is not None else ("slurm (queued)" if any(j is job for j, *_ in self.pending)
                                                           else "")

    def running(self) -> bool:
        return bool(self.jobs or self.pending)

    def stop(self) -> list[Job]:
        self.pending.clear()
        jobs = list(self.jobs)
        for sj in self.jobs.values():
            sj.cancel(check=False)  # SIGTERM (scancel) or SIGINT (local): run_phase stops the command cleanly
        deadline = time.time() + TERMINATE_GRACE_S + 15
        while time.time() < deadline and not all(sj.done() for sj in self.jobs.values()):
            time.sleep(0.2)
        self.jobs.clear()
        return jobs

    def kill(self) -> None:
        for sj in self.jobs.values():
            sj.cancel(check=False)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Choosing one


@dataclass(frozen=True)
class BackendOptions:
    """`rlp ablate`'s --backend and the options of each backend."""

    name: str = "local"  # local | ray | slurm
    gpus_per_run: int | None = None  # None: 1 where GPUs are used, else 0
    cpus_per_run: int = 1  # ray and slurm (the local backend shares out the cores itself)
    ray_address: str | None = None
    ray_dashboard: bool = False
    slurm_partition: str | None = None
    slurm_time_min: int = 240
    slurm_array_parallelism: int | None = None
    slurm_executor: str = "slurm"  # slurm | local (submitit's local executor: no cluster needed)


def make_backend(options: BackendOptions, devices: str | None, jobs: int | None, n_jobs: int, folder: Path):
    from rlp_cli.ablate.scheduler import LocalBackend, make_slots

    gpus = options.gpus_per_run
    if gpus is not None and gpus < 0 or options.cpus_per_run < 1:
        raise UserError("--gpus-per-run must be at least 0 and --cpus-per-run at least 1.")
    if options.name == "local":
        return LocalBackend(make_slots(devices, jobs, n_jobs, gpus_per_slot=gpus or 1))
    if options.name == "ray":
        return RayBackend(options.ray_address, options.cpus_per_run, gpus or 0, options.ray_dashboard)
    if options.name == "slurm":
        return SlurmBackend(folder / ".submitit", executor=options.slurm_executor, partition=options.slurm_partition,
                            cpus_per_run=options.cpus_per_run, gpus_per_run=gpus or 0,
                            time_min=options.slurm_time_min, array_parallelism=options.slurm_array_parallelism)
    raise UserError(f"--backend {options.name}: expected local, ray or slurm.")
