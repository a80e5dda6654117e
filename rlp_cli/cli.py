"""The `rlp` command line. Every command turns bad input into a one-paragraph error and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rlp_cli.errors import RunFailed, UserError, storage_failure

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # rlp never downloads at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train language models with RLP (Reinforcement as a Pretraining Objective) and run its ablations.")
console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set objective.num_rollouts=8 (repeatable).")


@app.command()
def train(
    config: str = typer.Argument(..., help="A YAML config file, or a built-in config name (default, tiny)."),
    set_: Optional[List[str]] = SetOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<config name>)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the config)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a live progress bar."),
    nproc: int = typer.Option(1, "--nproc", help="Processes for this one run (data parallel, via torchrun): "
                              "one per GPU, or a share of the CPU cores each."),
):
    """Train one model. Re-running the same command resumes from the last checkpoint."""
    from rlp_cli.config import load_config
    from rlp_cli.run import train as run_training

    overrides = list(set_ or []) + ([f"device={device}"] if device else [])
    cfg = load_config(config, overrides)
    out = out or Path("runs") / cfg.name
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_torchrun(nproc, config, list(set_ or []), out, device, progress))
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        console.print(f"[bold]rlp train[/bold] {cfg.name}: objective={cfg.objective.name} "
                      f"reward={cfg.objective.reward_name()} model={cfg.model.name} -> {out}")
    status = run_training(cfg, out, progress=progress)
    if not main_rank:
        return
    console.print(f"[green]{status['status']}[/green] after {status.get('step')} steps "
                  f"({status.get('input_tokens', 0)} input tokens, {status.get('wall_time_s', 0)} s). "
                  f"Metrics: {out / 'metrics.jsonl'}; model: {out / 'final'}")


def _torchrun(nproc: int, config: str, sets: list[str], out: Path, device: str | None, progress: bool) -> int:
    """`rlp train --nproc N` is `torchrun --standalone --nproc-per-node N -m rlp_cli.cli train ...` on this node."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "rlp_cli.cli", "train", config, "--out", str(out), "--progress" if progress else "--no-progress"]
    argv += [a for item in sets for a in ("--set", item)] + (["--device", device] if device else [])
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = str(max(1, int(env.get("RLP_NUM_THREADS", cores)) // nproc))  # never more threads than cores
    env.update(RLP_NUM_THREADS=share, OMP_NUM_THREADS=share)
    console.print(f"[bold]rlp train[/bold] over {nproc} processes ({share} threads each): {' '.join(argv[2:])}",
                  highlight=False)
    sys.stdout.flush()
    # torchrun takes this process's place: signals (Ctrl-C, rlp ablate stopping a run, the parent-death
    # signal) reach torchrun itself, which stops its workers; nothing is left orphaned
    os.execve(sys.executable, argv, env)


@app.command()
def validate(
    file: Optional[str] = typer.Argument(None, help="A run config or an ablation YAML."),
    set_: Optional[List[str]] = SetOption,
    show_defaults: bool = typer.Option(False, "--show-defaults", help="Print every setting with its default."),
):
    """Check a config without running anything; print it fully resolved."""
    import yaml

    from rlp_cli.config import TrainConfig, load_config

    if show_defaults or file is None:
        console.print(yaml.safe_dump(TrainConfig().to_dict(), sort_keys=False))
        return
    from rlp_cli.ablate import is_ablation_source, validate_ablation

    if is_ablation_source(file):  # an ablation: expand it and validate every run
        validate_ablation(file, list(set_ or []))
        return
    cfg = load_config(file, list(set_ or []))
    from rlp_cli.rewards import get_reward

    if cfg.objective.name != "ntp":
        get_reward(cfg.objective.reward_name())
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    console.print(f"[green]{file}: valid[/green]")


@app.command("ls")
def list_things(what: Optional[str] = typer.Argument(None, help="configs | presets | models | corpora | rewards")):
    """List built-in configs, ablation presets, models, corpora and rewards."""
    from rich.table import Table

    from rlp_cli.ablate import preset_descriptions
    from rlp_cli.config import builtin_config_names
    from rlp_cli.data import BUILTIN_CORPORA
    from rlp_cli.models import BUILTIN_MODELS
    from rlp_cli.rewards import REWARDS

    sections = {
        "configs": {n: "built-in run config (rlp_cli/configs)" for n in builtin_config_names()},
        "presets": preset_descriptions(),
        "models": BUILTIN_MODELS,
        "corpora": BUILTIN_CORPORA,
        "rewards": {n: f"[{s.kind}] {s.description}" for n, s in sorted(REWARDS.items())},
    }
    if what and what not in sections:
        raise UserError(f"rlp ls: unknown section '{what}'. Fix: use one of {', '.join(sections)}.")
    for name, rows in sections.items():
        if what and name != what:
            continue
        table = Table(title=name, show_header=False, title_justify="left")
        for key, desc in rows.items():
            table.add_row(f"[bold]{key}[/bold]", desc)
        console.print(table)


@app.command("copy-preset")
def copy_preset(
    name: str = typer.Argument(..., help="A built-in preset (`rlp ls presets`)."),
    dest: Optional[Path] = typer.Argument(None, help="Where to write it (default: ablations/NAME.yaml here)."),
    force: bool = typer.Option(False, "--force", help="Overwrite DEST if it exists."),
):
    """Copy a preset out to edit it. A copy in ./ablations/ takes the preset's name: `rlp ablate NAME` then runs it."""
    from rlp_cli.ablate.preset import resolve_preset

    source = resolve_preset(name)
    dest = dest or Path("ablations") / f"{name}.yaml"
    if dest.exists() and not force:
        raise UserError(f"{dest} exists. Fix: pass another destination, or --force to overwrite it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(source.read_text())
    console.print(f"wrote {dest} (from {source}). Edit it, then: rlp ablate "
                  f"{name if dest.resolve() == (Path('ablations') / f'{name}.yaml').resolve() else dest}",
                  highlight=False)


def _register_subcommands() -> None:
    """Commands that live beside their code (ablate, eval, report, bench) add themselves via register(app)."""
    import importlib
    import importlib.util

    for name in ("ablate", "evaluate", "report", "bench"):
        if importlib.util.find_spec(f"rlp_cli.{name}") is not None:
            importlib.import_module(f"rlp_cli.{name}").register(app)


_register_subcommands()


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # typer returns (not raises) the exit code of a handled Ctrl-C
        sys.exit(rc if isinstance(rc, int) else 0)
    except UserError as e:
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]: nothing finished is lost; run the same command again to resume.")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except RunFailed as e:  # diverged, disk full: not bad input, but no traceback either
        err_console.print(f"[bold red]failed:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a full or broken disk outside a training run (ablate's manifest, a report)
        failure = storage_failure(e, "writing a file")
        if failure is None:
            raise
        err_console.print(f"[bold red]failed:[/bold red] {failure}", highlight=False, soft_wrap=True)
        sys.exit(failure.exit_code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        raise

if __name__ == "__main__":
    main()
