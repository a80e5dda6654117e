"""The scheduler: one job per run (its phases `rlp train`, then `rlp eval`) or per base-model evaluation, run
by a backend, with a live table; Ctrl-C, SIGTERM and SIGHUP stop every child so that each run stays resumable.

A backend decides where a phase runs and owns the processes (the `Backend` protocol below); the scheduler
decides what runs next and what a finished phase means. `LocalBackend` runs child processes on this machine:
one slot per GPU, or the CPU cores shared out between slots (`make_slots`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from rich.console import Console

from rlp_cli import runio
from rlp_cli.ablate.plan import Run
from rlp_cli.ablate.store import EvalWanted, write_eval_marker
from rlp_cli.errors import UserError
from rlp_cli.runfolder import RunFolder
from rlp_cli.trackers import GROUP_ENV

console = Console()
err_console = Console(stderr=True)

TERMINATE_GRACE_S = 20.0  # a child gets this long after SIGINT to write "interrupted" before SIGTERM / SIGKILL
POLL_S = 0.5
RUN_MEMORY_GB = 4  # a smollm2-135m RLP run on CPU: weights, AdamW state, EMA teacher, activations (~3 GB)


@dataclass(eq=False)  # compared (and hashed) by identity: a backend keys its children by job
class Job:
    """One run (or the base-model evaluation) and its remaining phases: ["train", "eval"]."""

    name: str
    folder: Path
    phases: list[str]
    run: Run | None = None
    model: str | None = None  # base-model evaluation: the model spec to evaluate
    eval_sets: list[str] = field(default_factory=list)  # base-model evaluation: run-config keys for `rlp eval --set`
    state: str = "queued"  # queued | train | eval | done | failed | interrupted
    started: float = 0.0
    finished: float = 0.0
    error: str = ""


class Backend(Protocol):
    """Where the phases of jobs run. A job keeps its place from one phase to the next until it is released."""

    def describe(self) -> str:
        """One line for the user: where the jobs will run."""

    def has_room(self) -> bool:
        """Whether a new job can start now."""

    def submit(self, job: Job, phase: str, argv: list[str]) -> str:
        """Start one phase of a job (the command line `argv`, its output to the phase's log in the run folder);
        a job that goes on to its next phase keeps its place. Returns where it runs, e.g. `cuda:0`."""

    def poll(self) -> list[tuple[Job, int]]:
        """The phases that ended since the last call, with their exit codes."""

    def release(self, job: Job) -> None:
        """The job has no phase left to run here: free its place."""

    def where(self, job: Job) -> str:
        """Where the job's current phase runs; empty when none is running."""

    def running(self) -> bool:
        """Whether any phase is running (or has ended and was not polled yet)."""

    def stop(self) -> list[Job]:
        """Stop every running phase so that it stays resumable; returns those jobs, their places freed."""

    def kill(self) -> None:
        """Stop every running phase at once (a second Ctrl-C)."""


# ---------------------------------------------------------------------------------------------
# The local backend: child processes on this machine, in slots


@dataclass
class Slot:
    label: str  # cpu | cuda:N
    env: dict[str, str]
    busy: bool = False


def memory_gb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**30
    except (ValueError, OSError, AttributeError):
        return RUN_MEMORY_GB


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def make_slots(devices: str | None, jobs: int | None, n_jobs: int, gpus_per_slot: int = 1) -> list[Slot]:
    """GPUs: one slot per device, or per group of gpus_per_slot devices for a run over several GPUs
    (CUDA_VISIBLE_DEVICES in the child). CPU: the cores shared out, never oversubscribed."""
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: must be at least 1.")
    cores = cpu_count()
    spec = (devices or "auto").strip()
    if spec == "auto":
        gpus = visible_gpus()
    elif spec == "cpu":
        gpus = []
    else:
        gpus = [d.strip() for d in spec.split(",") if d.strip()]
        if not gpus or not all(d.isdigit() for d in gpus):
            raise UserError(f"--devices {devices}: expected `cpu`, `auto` or GPU ids like 0,1.")
    if gpus and gpus_per_slot > 1:
        groups = [",".join(gpus[i:i + gpus_per_slot]) for i in range(0, len(gpus) - gpus_per_slot + 1, gpus_per_slot)]
        if not groups:
            raise UserError(f"--gpus-per-run {gpus_per_slot}: only {len(gpus)} GPU(s) visible ({','.join(gpus)}). "
                            "Fix: lower --gpus-per-run, or pass --devices with more GPUs.")
        n = min(jobs or len(groups), len(groups))
        threads = max(1, cores // n)
        return [Slot(f"cuda:{g}", _thread_env(threads) | {"CUDA_VISIBLE_DEVICES": g}) for g in groups[:n]]
    if gpus_per_slot > 1:
        raise UserError(f"--gpus-per-run {gpus_per_slot}: no GPU is visible here. Fix: drop --gpus-per-run, or run "
                        "on a machine with GPUs.")
    if gpus:
        n = jobs or len(gpus)
        threads = max(1, cores // n)
        devices_in_turn = [gpus[i % len(gpus)] for i in range(n)]
        return [Slot(f"cuda:{d}", _thread_env(threads) | {"CUDA_VISIBLE_DEVICES": d}) for d in devices_in_turn]
    # By default one run per core: a small model gains little from more threads (two 1-thread runs beat one
    # 2-thread run), as many as memory allows at ~RUN_MEMORY_GB each.
    n = jobs or max(1, min(cores, memory_gb() // RUN_MEMORY_GB))
    if n > cores:
        err_console.print(f"[yellow]--jobs {n} > {cores} CPU cores[/yellow]: running {cores} at a time "
                          "(more would oversubscribe the cores).")
        n = cores
    n = max(1, min(n, n_jobs))
    threads = max(1, cores // n)
    cap = int(os.environ.get("RLP_NUM_THREADS", "0") or 0)
    if cap:
        threads = min(threads, cap)  # an explicit per-process limit in the environment is respected
    return [Slot("cpu", _thread_env(threads) | {"CUDA_VISIBLE_DEVICES": ""}) for _ in range(n)]


def group_env(job: Job) -> dict[str, str]:
    """The trackers of log.report_to group a grid's runs by the ablation's name: its folder, <out>/<name>/<run>."""
    return {GROUP_ENV: job.folder.parent.name}


def _thread_env(threads: int) -> dict[str, str]:
    return {"RLP_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `rlp ablate` dies (even by kill -9), so no orphan keeps training."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class _Child:
    slot: Slot
    proc: subprocess.Popen | None = None
    log_fh: IO[str] | None = None


class LocalBackend:
    """Child processes on this machine, one per slot; a job keeps its slot for all its phases."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.children: dict[Job, _Child] = {}  # a job with a slot; proc is None between two of its phases

    def describe(self) -> str:
        return f"slots: {len(self.slots)} x {self.slots[0].label} ({self.slots[0].env['RLP_NUM_THREADS']} threads each)"

    def has_room(self) -> bool:
        return any(not s.busy for s in self.slots)

    def submit(self, job: Job, phase: str, argv: list[str]) -> str:
        child = self.children.get(job)
        if child is None:
            child = self.children[job] = _Child(next(s for s in self.slots if not s.busy))
        slot = child.slot
        child.log_fh = open(RunFolder(job.folder).log(phase), "a")
        child.log_fh.write(f"\n=== rlp ablate {runio.now()} on {slot.label} "
                           f"({slot.env['RLP_NUM_THREADS']} threads): {' '.join(argv)}\n")
        child.log_fh.flush()
        env = {**os.environ, **slot.env, **group_env(job), "PYTHONUNBUFFERED": "1"}
        child.proc = subprocess.Popen(argv, stdout=child.log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, start_new_session=True,  # Ctrl-C reaches us; we stop children cleanly
                                      preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        slot.busy = True
        return slot.label

    def poll(self) -> list[tuple[Job, int]]:
        ended = []
        for job, child in self.children.items():
            if child.proc is not None and (rc := child.proc.poll()) is not None:
                child.log_fh.close()
                child.proc = None
                ended.append((job, rc))
        return ended

    def release(self, job: Job) -> None:
        self.children.pop(job).slot.busy = False

    def where(self, job: Job) -> str:
        child = self.children.get(job)
        return child.slot.label if child is not None and child.proc is not None else ""

    def running(self) -> bool:
        return any(c.proc is not None for c in self.children.values())

    def stop(self) -> list[Job]:
        """SIGINT (the trainer records `interrupted`), then SIGTERM, then SIGKILL."""
        active = [(job, c) for job, c in self.children.items() if c.proc is not None]
        for sig, grace in ((signal.SIGINT, TERMINATE_GRACE_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for _, child in active:
                if child.proc.poll() is None:
                    try:
                        os.killpg(child.proc.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.time() + grace
            while time.time() < deadline and any(c.proc.poll() is None for _, c in active):
                time.sleep(0.1)
            if all(c.proc.poll() is not None for _, c in active):
                break
        for job, child in active:
            child.log_fh.close()
            child.proc = None
            self.release(job)
        return [job for job, _ in active]

    def kill(self) -> None:
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The scheduler


def eval_available() -> bool:
    """Whether `rlp eval` is part of this installation (its command lives in rlp_cli/evaluate.py)."""
    return importlib.util.find_spec("rlp_cli.evaluate") is not None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


class Scheduler:
    def __init__(self, jobs: list[Job], backend: Backend, want: EvalWanted | None, fail_fast: bool, nproc: int = 1):
        self.nproc = nproc  # processes per training run (data parallel over --gpus-per-run GPUs)
        self.queue = list(jobs)
        self.jobs = list(jobs)
        self.backend = backend
        self.want = want
        self.fail_fast = fail_fast
        self.stopping = False
        self.live = None

    # -- one phase of a job

    def argv(self, job: Job, phase: str) -> list[str]:
        cli = [sys.executable, "-m", "rlp_cli.cli"]
        folder = RunFolder(job.folder)
        if phase == "train":
            nproc = ["--nproc", str(self.nproc)] if self.nproc > 1 else []
            return cli + ["train", str(folder.config), "--out", str(job.folder), "--no-progress", *nproc]
        settings = [arg for item in self.want.settings for arg in ("--set", item)]
        if job.model is not None:  # the untrained base model
            return cli + ["eval", job.model, "--suite", self.want.suite, "--out", str(folder.eval_json),
                          *settings, *[arg for item in job.eval_sets for arg in ("--set", item)]]
        return cli + ["eval", str(job.folder), "--suite", self.want.suite, *settings]

    def start(self, job: Job) -> None:
        phase = job.phases.pop(0)
        job.folder.mkdir(parents=True, exist_ok=True)
        if phase == "train":
            runio.write_yaml(RunFolder(job.folder).config, job.run.config.to_dict())
        where = self.backend.submit(job, phase, self.argv(job, phase))
        job.state, job.started = phase, job.started or time.time()
        self.say(f"[cyan]start[/cyan] {job.name} ({phase}) on {where}")

    def finish(self, job: Job, returncode: int) -> None:
        phase = job.state
        ok = returncode == 0
        if phase == "train":
            status = RunFolder(job.folder).read_status()
            ok = ok and status.get("status") == "completed"
            error = status.get("error") or f"exit code {returncode}"
        else:
            error = f"`rlp eval` exit code {returncode}"
            write_eval_marker(job.folder, self.want, ok, "" if ok else error)
        if ok and job.phases:
            self.start(job)  # same place, next phase
            return
        self.backend.release(job)
        job.finished = time.time()
        if ok:
            job.state = "done"
            self.say(f"[green]done[/green] {job.name} in {job.finished - job.started:.0f} s")
            return
        job.state, job.error = "failed", error
        log = RunFolder(job.folder).log(phase)
        from rich.markup import escape  # a log line like "[run] step 3" is not rich markup

        self.say(f"[bold red]failed[/bold red] {job.name} ({phase}): {escape(error)}\n"
                 f"[dim]--- last lines of {log} ---[/dim]\n{escape(log_tail(log))}")
        if self.fail_fast:
            self.say("[red]--fail-fast: stopping the other runs (they stay resumable)[/red]")
            self.stopping = True

    def stop_children(self) -> None:
        """Every running phase is stopped resumably (see Backend.stop) and its job marked interrupted."""
        for job in self.backend.stop():
            job.state = "interrupted"

    # -- the loop

    def run(self) -> None:
        """Start jobs while the backend has room until the queue is empty; Ctrl-C, SIGTERM or SIGHUP stops every
        child cleanly."""
        # SIGTERM (a scheduler, kill) and SIGHUP (the terminal closed) stop the grid as Ctrl-C does
        # (and SIGINT, which a process started in the background of a script inherits ignored)
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
        live = None
        order = {id(job): i for i, job in enumerate(self.jobs)}
        try:
            if console.is_terminal:
                from rich.live import Live

                live = self.live = Live(self.table(), console=console, refresh_per_second=2, transient=False)
                live.start()
            while True:
                for job, rc in sorted(self.backend.poll(), key=lambda ended: order[id(ended[0])]):
                    self.finish(job, rc)
                if self.stopping:
                    self.stop_children()
                    break
                while self.queue and self.backend.has_room():
                    self.start(self.queue.pop(0))
                if not self.queue and not self.backend.running():
                    break
                if live is not None:
                    live.update(self.table())
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.say("[yellow]interrupted: stopping the running children; every run stays resumable[/yellow]")
            try:
                self.stop_children()
            except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
                self.backend.kill()
            raise
        except Exception:  # a backend that failed (sbatch refused, a lost Ray cluster): stop what runs, then report
            self.say("[red]the scheduler failed: stopping the running children; every run stays resumable[/red]")
            self.stop_children()
            raise
        finally:
            if live is not None:
                live.update(self.table())
                live.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def say(self, message: str) -> None:
        (self.live.console if self.live else console).print(message, highlight=False)

    # -- the live table

    def table(self):
        from rich.table import Table

        table = Table(title="rlp ablate", title_justify="left")
        for col in ("run", "status", "step", "reward / loss", "ETA", "device"):
            table.add_column(col)
        colors = {"done": "green", "failed": "red", "train": "cyan", "eval": "cyan", "interrupted": "yellow"}
        for job in self.jobs:
            step, value, eta = self.progress(job)
            state = {"train": "training", "eval": "evaluating"}.get(job.state, job.state)
            table.add_row(job.name, f"[{colors.get(job.state, 'white')}]{state}", step, value, eta,
                          self.backend.where(job))
        return table

    def progress(self, job: Job) -> tuple[str, str, str]:
        if job.run is None or job.state not in ("train", "eval", "done", "interrupted"):
            return "", "", ""
        row = RunFolder(job.folder).last_metrics()
        if not row:
            return "0", "", ""
        value = f"{row['reward']:+.4f}" if "reward" in row else (f"{row['loss']:.3f}" if "loss" in row else "")
        cfg = job.run.config.budget
        tokens = row.get("input_tokens") or 0
        total = cfg.steps
        if cfg.input_tokens and tokens:
            by_tokens = math.ceil(cfg.input_tokens * row["step"] / tokens)
            total = min(total, by_tokens) if total else by_tokens
        step_text = f"{row['step']}/{total or '?'}"
        eta = ""
        if job.state == "train" and total and row.get("step_time"):
            eta = f"{max(0, total - row['step']) * row['step_time']:.0f} s"
        return step_text, value, eta


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
