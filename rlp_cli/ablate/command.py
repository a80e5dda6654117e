"""The `rlp ablate` command, and the helpers `rlp validate` and `rlp ls presets` use.

plan_ablation: preset file -> checked plan; run_ablation: plan -> results folder (manifest, lock, the state of
each run) -> jobs -> scheduler -> summary.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import sys
from pathlib import Path
from typing import Optional

import yaml
from rich.console import Console

from rlp_cli.ablate.plan import Plan, Run, base_eval_overrides, base_model_dirs, expand
from rlp_cli.ablate.preset import load_preset, preset_paths
from rlp_cli.ablate.backends import BackendOptions, make_backend
from rlp_cli.ablate.scheduler import Job, Scheduler, eval_available
from rlp_cli.ablate.store import (EvalWanted, FolderLock, eval_done, eval_failed, format_changes, grid_changes,
                                  read_manifest, run_state, train_done, write_manifest)
from rlp_cli.config import read_text
from rlp_cli.errors import UserError
from rlp_cli.runfolder import MANIFEST_FILE, RunFolder

console = Console()
err_console = Console(stderr=True)


def plan_ablation(source: str, cli_overrides: list[str] | None = None, seeds: list[int] | None = None,
                  eval_suite: str | None = None, check_rewards: bool = True) -> Plan:
    """Read the preset, expand it, and check its eval suite and rewards against what this installation has."""
    preset, path = load_preset(source)
    plan = expand(preset, path, cli_overrides, seeds, eval_suite,
                  note=lambda text: err_console.print(f"[yellow]note[/yellow]: {text}", highlight=False))
    if plan.eval_suite != "none" and importlib.util.find_spec("rlp_cli.evaluate") is not None:
        from rlp_cli import suites

        if not (plan.eval_suite in suites.SUITES or plan.eval_suite.startswith("lm-eval:")):
            raise UserError(f"{path}: key 'eval' = {plan.eval_suite!r} is not an evaluation suite. Fix: use one of "
                            f"{', '.join(suites.SUITES)}, lm-eval:TASKS, or none.")
        try:
            suites.parse_settings(plan.eval_suite, plan.eval_settings)
        except UserError as e:
            raise UserError(f"{path}: key 'eval.set': {e}") from None
    if check_rewards:
        from rlp_cli.rewards import get_reward

        for run in plan.runs:
            if run.config.objective.name != "ntp":
                try:
                    get_reward(run.config.objective.reward_name())
                except UserError as e:
                    raise UserError(f"{path}: run {run.name}: {e}") from None
    return plan


def select_runs(runs: list[Run], pattern: str | None) -> list[Run]:
    if not pattern:
        return runs
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    chosen = [r for r in runs if any(fnmatch.fnmatch(x, glob) for x in (r.name, r.arm, r.id, r.dir_name))]
    if not chosen:
        raise UserError(f"--only {pattern}: matches no run. Fix: pick from {', '.join(r.name for r in runs)}.")
    return chosen


def describe_overrides(run: Run) -> str:
    items = [f"{k}={v}" for k, v in run.overrides.items()]
    return ", ".join(items) or "(the base config)"


def print_plan(plan: Plan, runs: list[Run], folder: Path, states: dict[str, str] | None = None) -> None:
    from rich.table import Table

    n_arms, n_seeds = len(plan.arms), len({r.seed for r in plan.runs})
    console.print(f"[bold]{plan.name}[/bold] ({plan.path}): {len(plan.runs)} runs = {n_arms} arms x {n_seeds} seeds; "
                  f"models {', '.join(base_model_dirs(plan))}; baseline {plan.baseline}; eval {plan.eval_suite}; "
                  f"folder {folder}", highlight=False)
    table = Table(show_lines=False)
    for col in ("run", "id", "differs from the base", *(["status"] if states is not None else [])):
        table.add_column(col, overflow="fold")
    for run in runs:
        derived = "".join(f" [dim]({k} flop-matched to {d['flop_match']})[/dim]" for k, d in run.derived.items())
        table.add_row(run.name, run.id, describe_overrides(run) + derived,
                      *([states.get(run.name, "")] if states is not None else []))
    console.print(table)


def jobs_to_run(plan: Plan, runs: list[Run], folder: Path, want: EvalWanted | None, retry_failed: bool):
    """The jobs still to do (base-model evaluations first), and the runs done, failed earlier or busy elsewhere."""
    jobs: list[Job] = []
    skipped_failed, busy = [], []
    if want is not None:
        for model, dirname in base_model_dirs(plan).items():
            base_folder = folder / dirname
            if any(r.config.model.name == model for r in runs) and not eval_done(base_folder, want):
                if eval_failed(base_folder, want) and not retry_failed:
                    skipped_failed.append(f"{dirname} (eval of {model})")
                    continue
                jobs.append(Job(name=f"{dirname} ({model})", folder=base_folder, phases=["eval"], model=model,
                                eval_sets=base_eval_overrides(plan, model)))
    done = 0
    for run in runs:
        run_folder = folder / run.dir_name
        state = run_state(run_folder, want)
        if state == "done":
            done += 1
            continue
        if state == "busy":
            busy.append(run.name)
            continue
        if state == "failed" and not retry_failed:
            skipped_failed.append(run.name)
            continue
        phases = ([] if train_done(run_folder) else ["train"]) + (["eval"] if want else [])
        jobs.append(Job(name=run.name, folder=run_folder, phases=phases, run=run))
    return jobs, done, skipped_failed, busy


def run_ablation(source: str, out: Path = Path("results"), dry_run: bool = False, jobs: int | None = None,
                 devices: str | None = None, overrides: list[str] | None = None, only: str | None = None,
                 fail_fast: bool = False, retry_failed: bool = False, accept_changes: bool = False,
                 seeds: list[int] | None = None, eval_suite: str | None = None,
                 backend_options: BackendOptions = BackendOptions()) -> int:
    plan = plan_ablation(source, overrides, seeds, eval_suite)
    folder = Path(out) / plan.name
    runs = select_runs(plan.runs, only)
    want = None if plan.eval_suite == "none" else EvalWanted(plan.eval_suite, tuple(plan.eval_settings))

    if dry_run:
        previous = read_manifest(folder)
        if isinstance(previous, dict) and any((changes := grid_changes(previous, plan)).values()):
            console.print(f"[yellow]differs from {folder / MANIFEST_FILE}[/yellow] (a real run needs --accept-changes "
                          f"or --out):\n{format_changes(changes)}", highlight=False)
        states = {r.name: run_state(folder / r.dir_name, want) for r in runs}
        print_plan(plan, runs, folder, states)
        console.print("dry run: nothing was started.")
        return 0

    if want is not None and not eval_available():
        err_console.print(f"[yellow]warning[/yellow]: `rlp eval` is not available in this installation; training "
                          f"without evaluation (suite '{want.suite}'). Re-run the same command later to evaluate.")
        want = None

    with FolderLock(folder):
        write_manifest(plan, folder, accept_changes, accepted=lambda changes: console.print(
            f"[yellow]grid changed (accepted)[/yellow]:\n{format_changes(changes)}", highlight=False))
        jobs_list, done, skipped_failed, busy = jobs_to_run(plan, runs, folder, want, retry_failed)

        n_base = sum(j.run is None for j in jobs_list)
        counts = [f"{done} already done", f"{len(jobs_list) - n_base} to run"]
        counts += [f"+ {n_base} base-model eval"] if n_base else []
        counts += [f"{len(skipped_failed)} failed earlier (skipped)"] if skipped_failed else []
        counts += [f"{len(busy)} busy elsewhere"] if busy else []
        console.print(f"[bold]rlp ablate {plan.name}[/bold]: {len(runs)} runs in {folder}; " + ", ".join(counts),
                      highlight=False)
        for name in busy:
            err_console.print(f"[yellow]skipped[/yellow] {name}: another process is training it right now.")
        scheduler = None
        if jobs_list:
            backend = make_backend(backend_options, devices, jobs, len(jobs_list), folder)
            console.print(backend.describe(), highlight=False)
            scheduler = Scheduler(jobs_list, backend, want, fail_fast, nproc=backend_options.gpus_per_run or 1)
            try:
                scheduler.run()
            finally:
                getattr(backend, "close", lambda: None)()

        failed = [j.name for j in (scheduler.jobs if scheduler else []) if j.state == "failed"]
        unfinished = [j.name for j in (scheduler.jobs if scheduler else []) if j.state in ("queued", "interrupted")]
        print_summary(plan, runs, folder, want)
        if failed or skipped_failed or unfinished or busy:
            if failed:
                console.print(f"[red]failed[/red]: {', '.join(failed)} (logs: <run folder>/train.log or eval.log)",
                              highlight=False)
            if skipped_failed:
                console.print(f"[red]failed earlier, not retried[/red]: {', '.join(skipped_failed)}. Fix: "
                              "--retry-failed runs them again (from their last checkpoint).", highlight=False)
            if unfinished:
                console.print(f"[yellow]not finished[/yellow]: {', '.join(unfinished)}; run the same command again "
                              "to resume.", highlight=False)
            return 1
        console.print(f"[green]all {len(runs)} runs done[/green]. Next: rlp report {folder}", highlight=False)
        return 0


def print_summary(plan: Plan, runs: list[Run], folder: Path, want: EvalWanted | None) -> None:
    from rich.table import Table

    table = Table(title=f"{plan.name}: summary", title_justify="left")
    for col in ("run", "status", "steps", "input tokens", "wall s", "folder"):
        table.add_column(col, overflow="fold")
    for run in runs:
        status = RunFolder(folder / run.dir_name).read_status()
        state = run_state(folder / run.dir_name, want)
        table.add_row(run.name, state, str(status.get("step", "")), str(status.get("input_tokens", "")),
                      str(status.get("wall_time_s", "")), str(folder / run.dir_name))
    console.print(table)


def validate_ablation(source: str, overrides: list[str] | None = None) -> Plan:
    """`rlp validate` on an ablation: expand and validate every run; print them."""
    plan = plan_ablation(source, overrides)
    print_plan(plan, plan.runs, Path("results") / plan.name)
    console.print(f"[green]{plan.path}: valid ablation[/green] ({len(plan.runs)} runs, fingerprint {plan.fingerprint})",
                  highlight=False)
    return plan


def preset_descriptions() -> dict[str, str]:
    """For `rlp ls presets`: each preset's description (its `description:` key)."""
    out = {}
    for name, path in preset_paths().items():
        try:
            tree = yaml.safe_load(read_text(path)) or {}
            out[name] = " ".join(str(tree.get("description", "")).split()) or str(path)
        except (OSError, yaml.YAMLError, AttributeError, UserError) as e:
            out[name] = f"(unreadable: {type(e).__name__})"
    return out


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: expected integers separated by commas, e.g. --seeds 0,1,2.") from None


def register(app) -> None:
    import typer

    @app.command()
    def ablate(
        ablation: str = typer.Argument(..., help="A preset name (`rlp ls presets`) or an ablation YAML file."),
        out: Path = typer.Option(Path("results"), "--out", help="Results root; runs go to OUT/<ablation>/."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded runs and their status; run nothing."),
        jobs: Optional[int] = typer.Option(None, "--jobs",
                                           help="Runs at a time (default: one per GPU, or one per CPU core)."),
        devices: Optional[str] = typer.Option(None, "--devices", help="auto | cpu | GPU ids like 0,1 (default auto)."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a run setting in every run, "
                                                 "e.g. --set budget.steps=100 (repeatable)."),
        only: Optional[str] = typer.Option(None, "--only",
                                           help="Run only runs whose name, arm or id matches (glob or substring)."),
        fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop everything at the first failure."),
        retry_failed: bool = typer.Option(False, "--retry-failed",
                                          help="Run failed runs again (from their last checkpoint)."),
        accept_changes: bool = typer.Option(False, "--accept-changes",
                                            help="Adopt a changed grid in an existing results folder."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Replace the preset's seeds, e.g. --seeds 0,1,2."),
        eval_suite: Optional[str] = typer.Option(None, "--eval",
                                                 help="Replace the preset's eval suite (`none` skips evaluation)."),
        backend: str = typer.Option("local", "--backend", help="local | ray | slurm: where the runs go "
                                    "(README, 'Scaling out')."),
        gpus_per_run: Optional[int] = typer.Option(None, "--gpus-per-run", help="GPUs per run; above 1 a run is "
                                                   "data parallel over them (torchrun). Default 1 where GPUs are used."),
        cpus_per_run: int = typer.Option(1, "--cpus-per-run", help="ray, slurm: CPUs (and torch threads) per run."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="ray: join this cluster "
                                                  "(default: start a local Ray on 127.0.0.1)."),
        ray_dashboard: bool = typer.Option(False, "--ray-dashboard", help="ray: start the local Ray's dashboard."),
        slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help="slurm: the partition."),
        slurm_time: int = typer.Option(240, "--slurm-time", help="slurm: time limit per job, in minutes."),
        slurm_array_parallelism: Optional[int] = typer.Option(None, "--slurm-array-parallelism",
                                                              help="slurm: jobs of an array running at once."),
        slurm_executor: str = typer.Option("slurm", "--slurm-executor", help="slurm: `slurm`, or `local` to run the "
                                           "same jobs with submitit's local executor (no cluster needed)."),
    ):
        """Run an ablation grid: one training run per config, then evaluation; resumable.

        Exit code 0: every run done; 1: some failed or unfinished (named in the summary); 2: bad input."""
        try:
            options = BackendOptions(backend, gpus_per_run, cpus_per_run, ray_address, ray_dashboard, slurm_partition,
                                     slurm_time, slurm_array_parallelism, slurm_executor)
            code = run_ablation(ablation, out, dry_run, jobs, devices, list(set_ or []), only, fail_fast,
                                retry_failed, accept_changes, _parse_seeds(seeds), eval_suite, options)
        except KeyboardInterrupt:  # typer would turn it into an exit code that `rlp`'s main() drops
            err_console.print("[yellow]interrupted[/yellow]: the children were stopped and every run is resumable; "
                              "run the same command again to continue.")
            sys.exit(130)
        if code:
            sys.exit(code)  # sys.exit, not typer.Exit: with standalone_mode=False click returns Exit's code unused
