"""A run folder: train one config into it, resumably (`rlp train`, and each run of `rlp ablate`).

`train()` resumes from the folder's checkpoint when there is one, logs every step once (a resume
truncates the logs back to its checkpoint), holds a lease while it works, turns SIGTERM and SIGHUP into
an `interrupted` status, and ends with `completed`, `interrupted` or `failed` (and why) in status.json.
The files are named in rlp_cli/runfolder.py. Under torchrun only rank 0 writes. Each metrics row also goes to the
experiment trackers of log.report_to (rlp_cli/trackers.py), which are told the final status.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

from rlp_cli import distributed, runio
from rlp_cli.config import TrainConfig, flatten, without_tracking
from rlp_cli.errors import RunFailed, UserError, storage_failure
from rlp_cli.faults import failpoint
from rlp_cli.probe import Probe, probe_means
from rlp_cli.runfolder import RunFolder
from rlp_cli.trackers import open_trackers
from rlp_cli.train import Trainer


def _check_run_dir(run: RunFolder, config: TrainConfig) -> str | None:
    """Return the previous status of this folder, refusing a folder written by a different config."""
    if run.config.exists():
        import yaml

        previous = without_tracking(yaml.safe_load(run.config.read_text()) or {})
        current = without_tracking(config.to_dict())  # log.report_to may change between a run and its resume
        if previous != current:
            before, after = flatten(previous), flatten(current)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            raise UserError(f"{run.path}: this run folder was written by a different config (changed: {', '.join(changed)}); "
                            "resuming would mix two runs. Fix: pass another --out, or delete the folder to start over.")
    return run.status


def _write_status(run: RunFolder, status: str, **extra) -> None:
    runio.write_json(run.status_file, {"status": status, "updated": runio.now(), **extra})


def _record_end(run: RunFolder, status: str, **extra) -> None:
    """The last status of a run that stops on an error; on a full disk even this may not fit."""
    try:
        _write_status(run, status, **extra)
    except OSError:
        pass


def _clear_leftovers(run: RunFolder) -> None:
    """Temporary files of a process that was killed mid-write (kill -9, power loss): never read, so removed."""
    for tmp in list(run.path.glob("*.tmp")) + list(run.checkpoint.glob("*.tmp")):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise (ablation children, CI)."""

    def __init__(self, total: int | None, name: str, enabled: bool):
        self.name, self.total = name, total
        self.bar = None
        self.last_print = 0.0
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(name, total=total, info="")
            self.bar.start()
        self.enabled = enabled

    def update(self, m: dict) -> None:
        info = f"reward {m.get('reward', float('nan')):+.4f}  " if "reward" in m else f"loss {m['loss']:.3f}  "
        if "rlp/info_gain" in m:
            info += f"info_gain {m['rlp/info_gain']:+.4f}  "
        info += f"{m['step_time']:.2f}s/step"
        if self.bar is not None:
            self.bar.update(self.task, completed=m["step"], info=info)
        elif self.enabled and (time.time() - self.last_print > 10 or m["step"] == self.total):
            self.last_print = time.time()
            print(f"[{self.name}] step {m['step']}/{self.total or '?'}  {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _signal_as_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _holding_lease(run: RunFolder):
    """lease.json while this process works on the folder: a driver on another node, or a second `rlp ablate`,
    sees the run is taken (rank 0 holds it under torchrun)."""
    try:
        lease = runio.Lease(run.lease).__enter__()
    except runio.LeaseTaken as e:
        raise UserError(f"{run.path}: this run is being trained right now by process {e.holder.get('pid')} on "
                        f"{e.holder.get('host')} (its lease.json is fresh). Fix: wait for it, stop it, or pass "
                        "another --out.") from None
    try:
        yield lease
    finally:
        lease.__exit__(None, None, None)


def train(config: TrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train into out_dir, resuming from its checkpoint if one exists. Returns the final status."""
    import signal
    import threading

    run = RunFolder(out_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    main = distributed.world_from_env().is_main
    with _holding_lease(run) if main else contextlib.nullcontext():
        if threading.current_thread() is not threading.main_thread():
            return _train(config, run, progress)
        # a terminated run, or one whose terminal was closed, is marked resumable, not left "running". SIGINT is
        # set too: a process started in the background of a script inherits it ignored, and rlp ablate stops
        # its children with SIGINT first
        previous = {sig: signal.signal(sig, _signal_as_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP,
                                                                                signal.SIGINT)}
        try:
            return _train(config, run, progress)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _train(config: TrainConfig, run: RunFolder, progress: bool) -> dict:
    world = distributed.world_from_env()
    main = world.is_main  # under torchrun only rank 0 writes the run folder; the others train and return
    previous = _check_run_dir(run, config)
    if previous == "completed":
        return runio.read_json(run.status_file)
    started = time.time()
    trainer = trackers = None
    ended = "failed"  # what the trackers are told at the end
    try:
        if main:
            _clear_leftovers(run)
            runio.write_yaml(run.config, config.to_dict())
            _write_status(run, "running", step=0, pid=os.getpid(), host=platform.node())
        trainer = Trainer(config, run.path)
        resumed = trainer.load_checkpoint(run.checkpoint)
        if main:
            # A resumed run re-logs the steps after its checkpoint exactly once.
            for log in (run.metrics, run.samples, run.probe):
                if resumed:
                    runio.truncate_jsonl(log, trainer.step)
                elif log.exists():
                    log.unlink()
            runio.write_json(run.provenance, runio.provenance(
                seed=config.seed, device=str(trainer.device), torch_threads=trainer.threads, world_size=world.size,
                model_source=trainer.model_source, resumed_from_step=trainer.step if resumed else None,
                n_params=sum(p.numel() for p in trainer.model.parameters()),
                train_windows=len(trainer.stream.windows), heldout_documents=len(trainer.heldout_docs)))
            trackers = open_trackers(config, run.path, resumed_step=trainer.step if resumed else None)
        probe_every = config.log.probe_every
        probe = Probe(trainer) if main and probe_every and trainer.close_id is not None else None

        def run_probe(metrics: dict) -> None:
            row = probe.run(trainer.step)
            runio.append_jsonl(run.probe, row)
            metrics.update(probe_means(row))

        if probe is not None and trainer.step == 0:
            first = {"step": 0}
            run_probe(first)
            runio.append_jsonl(run.metrics, first)
            trackers.log(0, first)
        bar = _Progress(config.budget.steps, config.name, progress and main)
        try:
            while not trainer.done():
                metrics, sample = trainer.train_step()
                if probe is not None and (trainer.step % probe_every == 0 or trainer.done()):
                    run_probe(metrics)
                if main:
                    runio.append_jsonl(run.metrics, metrics)
                    trackers.log(trainer.step, metrics)
                    if sample is not None and (trainer.step == 1 or trainer.step % config.log.samples_every == 0):
                        runio.append_jsonl(run.samples, {"step": trainer.step, **sample})
                bar.update(metrics)
                every = config.log.checkpoint_every
                if every and trainer.step % every == 0 and not trainer.done():
                    trainer.save_checkpoint(run.checkpoint)
                    if main:
                        _write_status(run, "running", step=trainer.step, pid=os.getpid(), host=platform.node())
        finally:
            bar.close()
        status = {"status": "completed", "updated": runio.now(), "step": trainer.step,
                  "wall_time_s": round(time.time() - started, 2), **trainer.totals}
        if not main:
            return status
        if config.log.save_final:
            _save_final(trainer, run)
        runio.write_json(run.status_file, status)
        shutil.rmtree(run.checkpoint, ignore_errors=True)  # the final model supersedes it (once it is recorded)
        ended = "completed"
        return status
    except KeyboardInterrupt:
        ended = "interrupted"
        if main:
            _record_end(run, "interrupted", error="interrupted by the user; run the same command again to resume")
        raise
    except (UserError, RunFailed) as e:
        if main:
            _record_end(run, "failed", error=str(e), step=getattr(e, "step", None))
        raise
    except OSError as e:
        step = trainer.step if trainer is not None else 0
        failure = storage_failure(e, f"writing {run.path} at step {step}")
        if failure is None:
            if main:
                _record_end(run, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            raise
        failure.step = step
        if main:
            _record_end(run, "failed", error=str(failure), step=step)
        raise failure from None
    except Exception as e:
        if main:
            _record_end(run, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        if trackers is not None:
            trackers.close(ended)
        distributed.stop(world)


def _save_final(trainer: Trainer, run: RunFolder) -> None:
    """final/ appears whole or not at all (written as final.tmp/, then renamed)."""
    final_tmp = run.final_tmp
    try:
        trainer.model.save_pretrained(final_tmp)
        trainer.tok.save_pretrained(final_tmp)
    except BaseException:
        shutil.rmtree(final_tmp, ignore_errors=True)
        if not trainer.world.active:  # (under torchrun the other ranks are gone: the last checkpoint stays)
            trainer.save_checkpoint(run.checkpoint)  # a re-run resumes here and only retries the save
        raise
    failpoint("final-tmp-written")
    if run.final.exists():
        shutil.rmtree(run.final)
    os.replace(final_tmp, run.final)
    failpoint("final-renamed")
