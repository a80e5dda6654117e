"""`rlp ablate`: a YAML ablation grid expanded into training runs, scheduled on local GPUs or CPU cores.

Read top to bottom:
1. the preset schema (`Preset`) and how a preset file is found and validated;
2. `expand()`: base config + `set:` + `--set` + grid/zip/runs + seeds -> one `Run` per resolved TrainConfig,
   each with a stable id (a hash of its resolved config) and a folder `<readable-name>-<id>`;
3. the manifest (`manifest.json`) and the changed-grid check;
4. the state of a run folder on disk (done / resumable / failed / eval pending);
5. the scheduler: one child process per run (`rlp train`, then `rlp eval`), slots per GPU or per
   share of the CPU cores, a live table, Ctrl-C that leaves every run resumable;
6. the `rlp ablate` command, and the helpers `rlp validate` / `rlp ls` use.

Nothing here imports torch at module level, so `rlp --help` stays fast.
"""

from __future__ import annotations

import copy
import difflib
import fcntl
import fnmatch
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from rlp_cli import runio
from rlp_cli.config import BUILTIN_CONFIG_DIR, TrainConfig, apply_overrides, flatten, parse_override, read_text, read_yaml, \
    set_dotted, validation_message
from rlp_cli.errors import UserError

console = Console()
err_console = Console(stderr=True)

PRESET_DIRS = [Path("ablations"), Path(__file__).resolve().parent.parent / "ablations"]
MANIFEST = "manifest.json"
LOCK = ".lock"
TERMINATE_GRACE_S = 20.0  # a child gets this long after SIGINT to write "interrupted" before SIGTERM / SIGKILL
POLL_S = 0.5
RUN_MEMORY_GB = 4  # a smollm2-135m RLP run on CPU: weights, AdamW state, EMA teacher, activations (~3 GB)


# ---------------------------------------------------------------------------------------------
# 1. The preset schema


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Derive(Strict):
    # FLOP-match this key to another arm of the same grid point and seed, with RLP_SPEC's approximation
    #   T_flop = n_rollouts * l_seq * batch_size * iters + T_inp
    # computed from that arm's *config* (before anything runs), so ids stay stable; see flop_matched_tokens().
    flop_match: str


class ArmSpec(Strict):
    name: str
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set")  # dotted TrainConfig keys
    derive: dict[str, Derive] = Field(default_factory=dict)


class PaperLink(Strict):
    axis: str  # the `axis` column of reference/rlp_paper_results.csv
    values: dict[str, str] = Field(default_factory=dict)  # our arm -> the paper's `value` column


class ReportLayout(Strict):
    """How `rlp report` should lay out this ablation (it reads this block from manifest.json)."""

    title: Optional[str] = None
    axis: str = "arm"  # a dotted config key to put on the x axis, or `arm`
    x_scale: Literal["category", "linear", "log"] = "category"
    metrics: list[str] = Field(default_factory=lambda: ["overall"])  # eval metrics / group averages to show
    curves: list[str] = Field(default_factory=lambda: ["reward", "rlp/info_gain"])  # training curves vs input tokens
    paper: Optional[PaperLink] = None


class EvalSpec(Strict):
    suite: str = "quick"  # `rlp ls` / `rlp eval --help` lists the suites; `none` skips evaluation
    settings: dict[str, Any] = Field(default_factory=dict, alias="set")  # `rlp eval --set` items, e.g. n_per_task: 4


class Preset(Strict):
    name: Optional[str] = None  # default: the file name
    description: str = ""
    base: str | dict[str, Any] = "default"  # a built-in config name, a YAML path, or an inline config mapping
    common: dict[str, Any] = Field(default_factory=dict, alias="set")  # dotted overrides for every run
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # cartesian product
    paired: dict[str, list[Any]] = Field(default_factory=dict, alias="zip")  # lists of equal length, in step
    runs: list[ArmSpec] = Field(default_factory=list)  # explicit, heterogeneous arms
    seeds: list[int] = Field(default_factory=lambda: [0])
    baseline: Optional[str | dict[str, Any]] = None  # an arm name, `base` (the untrained model) or axis values
    evaluation: str | EvalSpec = Field("quick", alias="eval")  # a suite name, or {suite:, set:}; `none` skips it
    report: ReportLayout = Field(default_factory=ReportLayout)


# Top-level keys that mark a YAML file as an ablation rather than a run config (for `rlp validate`).
PRESET_ONLY_KEYS = {f.alias or name for name, f in Preset.model_fields.items()} - set(TrainConfig.model_fields)


def preset_paths() -> dict[str, Path]:
    """Presets found in ./ablations and in the project's ablations/ folder (the first one wins)."""
    found: dict[str, Path] = {}
    for folder in PRESET_DIRS:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


def resolve_preset(source: str) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: ablation file not found. Fix: check the path, or name a preset "
                            f"({', '.join(preset_paths()) or 'none found'}; `rlp ls presets`).")
        return path
    presets = preset_paths()
    if source in presets:
        return presets[source]
    close = difflib.get_close_matches(source, list(presets), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"ablation '{source}' is neither a YAML file nor a preset. Fix: {hint}use one of "
                    f"{', '.join(presets) or '(no presets found)'} (`rlp ls presets`), or pass a path to a .yaml file.")


def is_ablation_source(source: str) -> bool:
    """True for a preset name or a YAML file whose top level has ablation keys (grid:, runs:, seeds:, ...)."""
    path = Path(source)
    if not path.exists():
        return path.suffix not in (".yaml", ".yml") and source in preset_paths() and \
            not (BUILTIN_CONFIG_DIR / f"{source}.yaml").is_file()
    try:
        tree = yaml.safe_load(read_text(path))
    except (OSError, yaml.YAMLError, UserError):
        return False  # not readable as a preset: loading it as a run config gives the clear error
    return isinstance(tree, dict) and bool(set(tree) & PRESET_ONLY_KEYS)


def _schema_error(err: ValidationError, path: Path) -> UserError:
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_preset_keys(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
            parts.append(f"key '{key}' is not a known ablation setting ({hint})")
        elif e["type"] == "missing":
            parts.append(f"key '{key}' is required")
        else:
            parts.append(f"key '{key}' = {e.get('input')!r}: {e['msg']}")
    return UserError(f"{path}: invalid ablation: " + "; ".join(parts) + ". Fix: correct these keys (an ablation has "
                     f"{', '.join(_known_preset_keys([]))}; see the presets in ablations/ for commented examples).")


def _known_preset_keys(loc: list[str]) -> list[str]:
    model: Any = Preset
    for part in loc:
        if part.isdigit():
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        ann = fields[part].annotation if part in fields else None
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif inner:
            model = inner[0]
        else:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def load_preset(source: str) -> tuple[Preset, Path]:
    path = resolve_preset(source)
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level of an ablation must be a mapping (base:, grid:, runs:, seeds:, ...), "
                        f"not {type(tree).__name__}. Fix: see the presets in ablations/.")
    try:
        return Preset.model_validate(tree), path
    except ValidationError as e:
        raise _schema_error(e, path) from None


# ---------------------------------------------------------------------------------------------
# 2. Expansion: preset -> runs


@dataclass
class Run:
    name: str  # readable: arm + seed, e.g. `rlp_s0`, `num_rollouts-8_s1`
    arm: str  # the run without its seed; the unit a report compares
    seed: int
    config: TrainConfig
    axis_values: dict[str, Any]
    overrides: dict[str, Any]  # what differs from the resolved base config (dotted keys)
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return run_id(self.config)

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.id}"


@dataclass
class Plan:
    name: str
    path: Path
    preset: Preset
    base_flat: dict[str, Any]  # the base every run starts from (defaults + base + set + --set), flattened
    runs: list[Run]
    baseline: str  # an arm name, or `base`
    eval_suite: str
    eval_settings: list[str]  # `rlp eval --set` items
    cli_overrides: list[str]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(sorted(r.id for r in self.runs)).encode()).hexdigest()[:12]

    @property
    def arms(self) -> list[str]:
        return list(dict.fromkeys(r.arm for r in self.runs))

    def axes(self) -> dict[str, list[Any]]:
        axes: dict[str, list[Any]] = {}
        if self.preset.runs:
            axes["arm"] = [a.name for a in self.preset.runs]
        axes.update(self.preset.grid)
        axes.update(self.preset.paired)
        return axes


def run_id(config: TrainConfig) -> str:
    """Short hash of the fully resolved config; `name` is a label and does not change what is trained."""
    tree = config.to_dict()
    tree.pop("name", None)
    return hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]


def check_setting_key(key: str, where: str) -> None:
    """A dotted key must name a TrainConfig setting (e.g. objective.num_rollouts)."""
    model: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            known = [".".join([*parts[:i], k]) for k in fields]
            close = difflib.get_close_matches(".".join(parts[:i + 1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
            raise UserError(f"{where}: key '{key}' is not a run setting ({hint}). Fix: use a dotted key from "
                            "`rlp validate --show-defaults`, e.g. objective.num_rollouts.")
        ann = fields[part].annotation
        is_section = isinstance(ann, type) and issubclass(ann, BaseModel)
        if i < len(parts) - 1 and not is_section:
            raise UserError(f"{where}: key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section. "
                            "Fix: use a dotted key from `rlp validate --show-defaults`.")
        if i == len(parts) - 1 and is_section:
            raise UserError(f"{where}: key '{key}' is a whole section. Fix: name one setting inside it, "
                            f"e.g. {key}.{next(iter(ann.model_fields))}.")
        model = ann


def base_tree(preset: Preset, path: Path) -> dict:
    """The base config as a nested dict: a built-in name, a YAML path (relative to the preset) or a mapping."""
    if isinstance(preset.base, dict):
        tree: dict = {}
        for key, value in preset.base.items():  # nested mappings and dotted keys both work
            set_dotted(tree, key, copy.deepcopy(value)) if "." in key else tree.__setitem__(key, copy.deepcopy(value))
        return tree
    builtin = BUILTIN_CONFIG_DIR / f"{preset.base}.yaml"
    candidate = Path(preset.base)
    if not candidate.is_absolute() and (path.parent / candidate).is_file():
        candidate = path.parent / candidate
    if builtin.is_file() and not candidate.is_file():
        candidate = builtin
    if not candidate.is_file():
        raise UserError(f"{path}: key 'base' = {preset.base!r} is neither a built-in config "
                        f"({', '.join(p.stem for p in BUILTIN_CONFIG_DIR.glob('*.yaml'))}) nor a YAML file. "
                        "Fix: name a built-in config, a path relative to the ablation file, or an inline mapping.")
    tree = read_yaml(candidate) or {}
    if not isinstance(tree, dict):
        raise UserError(f"{candidate}: a run config must be a mapping of settings. "
                        "Fix: see `rlp validate --show-defaults`.")
    return tree


def _validate_tree(tree: dict, origin: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(validation_message(e, TrainConfig, origin)) from None


def label(value: Any) -> str:
    """A value as it appears in a folder name: 1e-4 -> 0.0001, [a, b] -> a+b, a/path/x.txt -> x."""
    if isinstance(value, (list, tuple)):
        text = "+".join(label(v) for v in value)
    elif isinstance(value, bool) or value is None:
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, str) and ("/" in value or "\\" in value):
        text = Path(value).stem
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_") or "x"


def _axis_short_names(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "-")) for k, s in zip(keys, last)}


def contexts_per_document(cfg: TrainConfig) -> int:
    d = cfg.data
    return {"random_one": 1, "answer": 1, "surprise": d.surprise_k}.get(d.positions, d.max_positions_per_document)


def flop_matched_tokens(cfg: TrainConfig) -> dict[str, Any]:
    """RLP_SPEC's FLOP-matched budget for a next-token arm, from a thought arm's config (upper bounds:
    full windows, thoughts of full length): T_flop = n_rollouts * l_seq * batch_size * iters + T_inp."""
    tokens_per_step = cfg.optim.batch_documents * cfg.data.max_context_tokens
    if cfg.budget.steps is not None:
        iters = cfg.budget.steps
        if cfg.budget.input_tokens is not None:
            iters = min(iters, math.ceil(cfg.budget.input_tokens / tokens_per_step))
    else:
        iters = math.ceil(cfg.budget.input_tokens / tokens_per_step)
    t_inp = iters * tokens_per_step if cfg.budget.input_tokens is None else \
        min(cfg.budget.input_tokens, iters * tokens_per_step)
    l_seq = cfg.objective.thought_tokens + (cfg.objective.prediction_tokens if cfg.objective.name == "rpt" else 0)
    batch = cfg.optim.batch_documents * contexts_per_document(cfg)
    if cfg.objective.name == "ntp":
        generated = 0
    else:
        generated = cfg.objective.num_rollouts * l_seq * batch * iters
    return {"value": generated + t_inp, "n_rollouts": cfg.objective.num_rollouts, "l_seq": l_seq,
            "batch_size": batch, "iters": iters, "T_inp": t_inp}


def expand(preset: Preset, path: Path, cli_overrides: list[str] | None = None, seeds: list[int] | None = None,
           eval_suite: str | None = None) -> Plan:
    """Every run of the grid, fully resolved and validated. Order: seed-major, so seed 0 of every arm comes first."""
    where = str(path)
    name = preset.name or path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{where}: key 'name' = {name!r} must be a plain folder name. Fix: use letters, digits, . _ -.")
    cli_overrides = list(cli_overrides or [])
    seeds = list(seeds if seeds is not None else preset.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: key 'seeds' = {seeds!r}: give at least one seed, each once. "
                        "Fix: e.g. seeds: [0, 1, 2].")

    # Every key must be a real setting; an axis cannot also be fixed by --set.
    for section, keys in (("set", preset.common), ("grid", preset.grid), ("zip", preset.paired)):
        for key in keys:
            check_setting_key(key, f"{where}: {section}")
    for arm in preset.runs:
        for key in [*arm.overrides, *arm.derive]:
            check_setting_key(key, f"{where}: runs[{arm.name}]")
    axis_keys = [*preset.grid, *preset.paired]
    for item in cli_overrides:
        key, _ = parse_override(item)
        check_setting_key(key, f"--set {item}")
        if key in axis_keys:
            raise UserError(f"--set {item}: '{key}' is an axis of this ablation ({where}); fixing it would collapse "
                            "the grid. Fix: edit the axis in the ablation file, or pick runs with --only.")
        if key == "seed":
            raise UserError(f"--set {item}: seeds are an axis of every ablation. Fix: use --seeds 0,1,2.")
    if set(preset.grid) & set(preset.paired):
        raise UserError(f"{where}: keys {sorted(set(preset.grid) & set(preset.paired))} appear under both grid and "
                        "zip. Fix: keep each axis in one of them.")
    lengths = {k: len(v) for k, v in preset.paired.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{where}: key 'zip': the paired lists differ in length ({lengths}). Fix: give every list "
                        "under zip the same number of values (one per run).")
    for key, values in [*preset.grid.items(), *preset.paired.items()]:
        if not values:
            raise UserError(f"{where}: axis '{key}' has no values. Fix: list at least one value.")
    arm_names = [a.name for a in preset.runs]
    if len(set(arm_names)) != len(arm_names):
        raise UserError(f"{where}: key 'runs': arm names repeat ({arm_names}). Fix: give every arm its own name.")
    for arm in preset.runs:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+=-]*", arm.name):
            raise UserError(f"{where}: runs[{arm.name!r}]: an arm name becomes a folder name. Fix: use letters, "
                            "digits, . + = - (no spaces or underscores).")
        for key, rule in arm.derive.items():
            target = next((a for a in preset.runs if a.name == rule.flop_match), None)
            if target is None or target is arm or target.derive:
                raise UserError(f"{where}: runs[{arm.name}].derive.{key}: flop_match '{rule.flop_match}' must name "
                                f"another arm without a derive block (arms: {', '.join(arm_names)}).")

    # An arm's own `set:` wins over --set (a FLOP-matched arm keeps budget.steps: null); say so.
    for item in cli_overrides:
        key, _ = parse_override(item)
        for arm in preset.runs:
            if key in arm.overrides or key in arm.derive:
                err_console.print(f"[yellow]note[/yellow]: --set {item} does not apply to arm '{arm.name}', which sets "
                                  f"{key} itself ({where}).", highlight=False)

    # The base every run starts from: base config, then the preset's `set:`, then --set.
    tree = base_tree(preset, path)
    for key, value in preset.common.items():
        set_dotted(tree, key, copy.deepcopy(value))
    tree = apply_overrides(tree, cli_overrides)
    # Not validated on its own: a base may be incomplete until an axis fills it in (e.g. budget.steps: null).
    base_flat = flatten(TrainConfig().to_dict()) | flatten(tree)

    short = _axis_short_names(axis_keys)
    grid_points = [dict(zip(preset.grid, combo)) for combo in itertools.product(*preset.grid.values())]
    zip_rows = [dict(zip(preset.paired, row)) for row in zip(*preset.paired.values())] or [{}]
    points = [{**g, **z} for g in grid_points for z in zip_rows]
    arms = preset.runs or [None]

    runs: list[Run] = []
    for seed in seeds:
        for point in points:
            resolved: dict[str, TrainConfig] = {}
            # arms without a derive block first: a derived arm reads the config of the arm it matches
            for arm in sorted(arms, key=lambda a: bool(a and a.derive)):
                run_tree = copy.deepcopy(tree)
                for key, value in point.items():
                    set_dotted(run_tree, key, copy.deepcopy(value))
                for key, value in (arm.overrides.items() if arm else []):
                    set_dotted(run_tree, key, copy.deepcopy(value))
                derived = {}
                for key, rule in (arm.derive.items() if arm else []):
                    calc = flop_matched_tokens(resolved[rule.flop_match])
                    set_dotted(run_tree, key, calc["value"])
                    derived[key] = {"flop_match": rule.flop_match, **calc}
                # keys sorted, so reordering the preset's axes keeps every folder name (and result) in place
                parts = ([arm.name] if arm else []) + [f"{short[k]}-{label(point[k])}" for k in sorted(point)]
                arm_name = "_".join(parts) or "run"
                run_name = f"{arm_name}_s{seed}"
                run_tree["seed"] = seed
                run_tree["name"] = run_name
                cfg = _validate_tree(run_tree, f"{where}: run {run_name}")
                if arm:
                    resolved[arm.name] = cfg
                flat = flatten(cfg.to_dict())
                overrides = {k: v for k, v in flat.items() if k not in ("name", "seed") and base_flat.get(k) != v}
                axis_values = ({"arm": arm.name} if arm else {}) | dict(point)
                runs.append(Run(run_name, arm_name, seed, cfg, axis_values, overrides, derived))
    order = {(a.name if a else None): i for i, a in enumerate(arms)}
    runs.sort(key=lambda r: (seeds.index(r.seed), points.index({k: r.axis_values[k] for k in axis_keys}),
                             order[r.axis_values.get("arm")]))

    by_id: dict[str, Run] = {}
    for run in runs:
        if run.id in by_id:
            raise UserError(f"{where}: runs '{by_id[run.id].name}' and '{run.name}' resolve to the same config "
                            f"(id {run.id}), so they would train the same model twice. Fix: make the arms differ, or "
                            "drop one.")
        by_id[run.id] = run

    spec = preset.evaluation if isinstance(preset.evaluation, EvalSpec) else EvalSpec(suite=preset.evaluation)
    suite = eval_suite if eval_suite is not None else spec.suite
    eval_settings = [f"{k}={json.dumps(v)}" for k, v in spec.settings.items()]
    return Plan(name=name, path=path, preset=preset, base_flat=base_flat, runs=runs,
                baseline=resolve_baseline(preset, runs, where), eval_suite=suite, eval_settings=eval_settings,
                cli_overrides=cli_overrides)


def resolve_baseline(preset: Preset, runs: list[Run], where: str) -> str:
    arms = list(dict.fromkeys(r.arm for r in runs))
    if preset.baseline is None:
        return arms[0]
    if isinstance(preset.baseline, str):
        if preset.baseline == "base" or preset.baseline in arms:
            return preset.baseline
        raise UserError(f"{where}: key 'baseline' = {preset.baseline!r} is not an arm of this ablation. Fix: use "
                        f"`base` (the untrained model) or one of: {', '.join(arms)}.")
    matches = list(dict.fromkeys(r.arm for r in runs if all(
        r.axis_values.get(k) == v for k, v in preset.baseline.items())))
    if len(matches) != 1:
        raise UserError(f"{where}: key 'baseline' = {preset.baseline!r} matches {len(matches)} arms "
                        f"({', '.join(matches) or 'none'}). Fix: give axis values that pick exactly one arm, or its "
                        f"name (arms: {', '.join(arms)}).")
    return matches[0]


def plan_ablation(source: str, cli_overrides: list[str] | None = None, seeds: list[int] | None = None,
                  eval_suite: str | None = None, check_rewards: bool = True) -> Plan:
    preset, path = load_preset(source)
    plan = expand(preset, path, cli_overrides, seeds, eval_suite)
    if plan.eval_suite != "none" and importlib.util.find_spec("rlp_cli.evaluate") is not None:
        from rlp_cli import evaluate

        if not (plan.eval_suite in evaluate.SUITES or plan.eval_suite.startswith("lm-eval:")):
            raise UserError(f"{path}: key 'eval' = {plan.eval_suite!r} is not an evaluation suite. Fix: use one of "
                            f"{', '.join(evaluate.SUITES)}, lm-eval:TASKS, or none.")
        try:
            evaluate.parse_settings(plan.eval_suite, plan.eval_settings)
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


# ---------------------------------------------------------------------------------------------
# 3. The manifest and the changed-grid check


def base_model_dirs(plan: Plan) -> dict[str, str]:
    """One untrained-model evaluation per distinct model: `base/` (or `base-<model>/` when the grid varies it)."""
    models = list(dict.fromkeys(r.config.model.name for r in plan.runs))
    return {m: "base" if len(models) == 1 else f"base-{label(m)}" for m in models}


def base_eval_overrides(plan: Plan, model: str) -> list[str]:
    """`rlp eval MODEL --set ...` items so the untrained model is scored on the held-out corpus and with the
    thought template of the first run that trains it (the baseline arm's, when the axis varies the corpus)."""
    defaults = flatten(TrainConfig().to_dict())
    runs = [r for r in plan.runs if r.config.model.name == model]
    first = next((r for r in runs if r.arm == plan.baseline), runs[0])
    keep = ("data.", "objective.thought_prompt", "objective.temperature", "model.dtype")
    return [f"{k}={json.dumps(v)}" for k, v in flatten(first.config.to_dict()).items()
            if k.startswith(keep) and defaults.get(k) != v]


def manifest_for(plan: Plan) -> dict:
    return {
        "ablation": plan.name,
        "preset": str(plan.path),
        "description": plan.preset.description,
        "fingerprint": plan.fingerprint,
        "axes": plan.axes(),
        "seeds": sorted({r.seed for r in plan.runs}),
        "baseline": plan.baseline,
        "eval_suite": plan.eval_suite,
        "eval_settings": plan.eval_settings,
        "report": plan.preset.report.model_dump(mode="json"),
        "cli_overrides": plan.cli_overrides,
        "base_models": [{"model": m, "dir": d} for m, d in base_model_dirs(plan).items()],
        "runs": [{"id": r.id, "name": r.name, "dir": r.dir_name, "arm": r.arm, "seed": r.seed,
                  "overrides": r.overrides, "axis_values": r.axis_values, "derived": r.derived,
                  "config": r.config.to_dict()} for r in plan.runs],
        "updated": runio.now(),
    }


def grid_changes(previous: dict, plan: Plan) -> dict[str, list[str]]:
    """Added / removed / altered runs against the manifest already in the folder, as printable lines."""
    old = {r["name"]: r for r in previous.get("runs", [])}
    new = {r.name: r for r in plan.runs}
    changes: dict[str, list[str]] = {"added": [], "removed": [], "altered": []}
    for name, run in new.items():
        if name not in old:
            changes["added"].append(f"{name} ({run.id})")
        elif old[name]["id"] != run.id:
            before, after = flatten(old[name].get("config", {})), flatten(run.config.to_dict())
            keys = sorted(k for k in set(before) | set(after) if k != "name" and before.get(k) != after.get(k))
            diff = ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys) or "config changed"
            changes["altered"].append(f"{name} ({old[name]['id']} -> {run.id}): {diff}")
    for name, run in old.items():
        if name not in new:
            changes["removed"].append(f"{name} ({run['id']})")
    return changes


def format_changes(changes: dict[str, list[str]], limit: int = 8) -> str:
    lines = []
    for kind, items in changes.items():
        for item in items[:limit]:
            lines.append(f"  {kind}: {item}")
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more {kind}")
    return "\n".join(lines)


def write_manifest(plan: Plan, folder: Path, accept_changes: bool) -> None:
    """Record the grid; refuse a changed grid unless --accept-changes (old runs stay on disk as `retired`)."""
    path = folder / MANIFEST
    previous = runio.read_json(path) if path.exists() else None
    if path.exists() and not isinstance(previous, dict):
        raise UserError(f"{path}: unreadable manifest. Fix: move it away (the run folders are untouched), then re-run.")
    manifest = manifest_for(plan)
    new_ids = {r.id for r in plan.runs}
    retired = [r for r in (previous or {}).get("retired_runs", []) if r.get("id") not in new_ids]  # back in the grid
    if previous:
        changes = grid_changes(previous, plan)
        if any(changes.values()):
            if not accept_changes:
                raise UserError(
                    f"{folder}: the grid of '{plan.name}' differs from the one recorded in {MANIFEST} "
                    f"(fingerprint {previous.get('fingerprint')} -> {plan.fingerprint}):\n{format_changes(changes)}\n"
                    "Refusing to mix two grids in one folder. Fix: pass --out <another folder> to run the new grid "
                    "apart, or --accept-changes to adopt it here (finished runs of the old grid stay on disk and are "
                    "listed under retired_runs in the manifest).")
            retired += [r | {"retired": runio.now()} for r in previous.get("runs", []) if r["id"] not in new_ids]
            console.print(f"[yellow]grid changed (accepted)[/yellow]:\n{format_changes(changes)}", highlight=False)
    manifest["retired_runs"] = retired
    runio.write_json(path, manifest)


class FolderLock:
    """fcntl.flock on <folder>/.lock: a second `rlp ablate` on the same folder refuses instead of corrupting it."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fh = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "unknown"
            self.fh.close()
            raise UserError(f"{self.path.parent}: another `rlp ablate` is already running on this folder ({holder}). "
                            "Fix: wait for it to finish (or stop it with Ctrl-C; its runs stay resumable), or pass "
                            "--out <another folder>.") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} since {runio.now()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()


# ---------------------------------------------------------------------------------------------
# 4. A run folder's state


@dataclass(frozen=True)
class EvalWanted:
    """The evaluation a run should end with: `rlp eval --suite SUITE --set SETTINGS...`."""

    suite: str
    settings: tuple[str, ...] = ()

    def marker(self, ok: bool, error: str = "") -> dict:
        return {"status": "completed" if ok else "failed", "suite": self.suite, "settings": list(self.settings),
                "updated": runio.now(), **({"error": error} if error else {})}

    def matches(self, marker: dict) -> bool:
        return marker.get("suite") == self.suite and list(marker.get("settings", [])) == list(self.settings)


def eval_done(folder: Path, want: EvalWanted) -> bool:
    """eval.json is there and was made with this suite and settings (per the runner's eval_status.json, else
    per eval.json itself, for an evaluation someone ran by hand)."""
    if not (folder / "eval.json").is_file():
        return False
    marker = runio.read_json(folder / "eval_status.json")
    if marker is not None:
        return want.matches(marker) and marker.get("status") == "completed"
    made_with = (runio.read_json(folder / "eval.json") or {}).get("suite")
    return not isinstance(made_with, dict) or made_with.get("name") == want.suite


def eval_failed(folder: Path, want: EvalWanted) -> bool:
    marker = runio.read_json(folder / "eval_status.json") or {}
    return marker.get("status") == "failed" and want.matches(marker)


def _rlp_process_alive(pid: int | None) -> bool:
    """Is pid a live rlp process (not a recycled pid)? Used to leave alone a run another process is training."""
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ProcessLookupError):
        return False
    return "rlp" in cmdline


def run_state(folder: Path, want: EvalWanted | None) -> str:
    """new | resume | eval | done | failed | busy.

    want None: no evaluation is wanted (or `rlp eval` is not available)."""
    status = runio.read_json(folder / "status.json") or {}
    state = status.get("status")
    if state == "completed":
        if want is None or eval_done(folder, want):
            return "done"
        return "failed" if eval_failed(folder, want) else "eval"
    if state == "failed":
        return "failed"
    if state == "running" and _rlp_process_alive(status.get("pid")):
        return "busy"
    if state in ("running", "interrupted") or (folder / "checkpoint").exists():
        return "resume"
    return "new"


def last_metrics(path: Path) -> dict | None:
    """The last complete row of a metrics.jsonl, reading only its tail."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


# ---------------------------------------------------------------------------------------------
# 5. The scheduler


@dataclass
class Slot:
    label: str  # cpu | cuda:N
    env: dict[str, str]
    busy: bool = False


@dataclass
class Job:
    """One run (or the base-model evaluation) and its remaining phases: ["train", "eval"]."""

    name: str
    folder: Path
    phases: list[str]
    run: Run | None = None
    model: str | None = None  # base-model evaluation: the model spec to evaluate
    eval_sets: list[str] = field(default_factory=list)  # base-model evaluation: run-config keys for `rlp eval --set`
    state: str = "queued"  # queued | train | eval | done | failed | interrupted
    proc: subprocess.Popen | None = None
    slot: Slot | None = None
    log_fh: Any = None
    started: float = 0.0
    finished: float = 0.0
    error: str = ""


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


def make_slots(devices: str | None, jobs: int | None, n_jobs: int) -> list[Slot]:
    """GPUs: one slot per device (CUDA_VISIBLE_DEVICES in the child). CPU: the cores shared out, never
    oversubscribed."""
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


def _thread_env(threads: int) -> dict[str, str]:
    return {"RLP_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `rlp ablate` dies (even by kill -9), so no orphan keeps training."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def eval_available() -> bool:
    """Whether an `eval` command is registered (it lives in rlp_cli/evaluate.py)."""
    from rlp_cli.cli import app

    return any((c.name or getattr(c.callback, "__name__", "")) == "eval" for c in app.registered_commands)


class Scheduler:
    def __init__(self, jobs: list[Job], slots: list[Slot], want: EvalWanted | None, fail_fast: bool):
        self.queue = list(jobs)
        self.jobs = list(jobs)
        self.slots = slots
        self.want = want
        self.fail_fast = fail_fast
        self.stopping = False
        self.live = None

    # -- child processes

    def argv(self, job: Job, phase: str) -> list[str]:
        cli = [sys.executable, "-m", "rlp_cli.cli"]
        if phase == "train":
            return cli + ["train", str(job.folder / "config.yaml"), "--out", str(job.folder), "--no-progress"]
        settings = [arg for item in self.want.settings for arg in ("--set", item)]
        if job.model is not None:  # the untrained base model
            return cli + ["eval", job.model, "--suite", self.want.suite, "--out", str(job.folder / "eval.json"),
                          *settings, *[arg for item in job.eval_sets for arg in ("--set", item)]]
        return cli + ["eval", str(job.folder), "--suite", self.want.suite, *settings]

    def start(self, job: Job, slot: Slot) -> None:
        phase = job.phases.pop(0)
        job.folder.mkdir(parents=True, exist_ok=True)
        if phase == "train":
            runio.write_yaml(job.folder / "config.yaml", job.run.config.to_dict())
        log = job.folder / ("train.log" if phase == "train" else "eval.log")
        job.log_fh = open(log, "a")
        argv = self.argv(job, phase)
        job.log_fh.write(f"\n=== rlp ablate {runio.now()} on {slot.label} "
                         f"({slot.env['RLP_NUM_THREADS']} threads): {' '.join(argv)}\n")
        job.log_fh.flush()
        env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
        job.proc = subprocess.Popen(argv, stdout=job.log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True,  # Ctrl-C reaches us; we stop children cleanly
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        job.state, job.slot, job.started = phase, slot, job.started or time.time()
        slot.busy = True
        self.say(f"[cyan]start[/cyan] {job.name} ({phase}) on {slot.label}")

    def finish(self, job: Job, returncode: int) -> None:
        phase = job.state
        job.log_fh.close()
        job.proc = None
        ok = returncode == 0
        if phase == "train":
            status = runio.read_json(job.folder / "status.json") or {}
            ok = ok and status.get("status") == "completed"
            error = status.get("error") or f"exit code {returncode}"
        else:
            error = f"`rlp eval` exit code {returncode}"
            runio.write_json(job.folder / "eval_status.json", self.want.marker(ok, "" if ok else error))
        if ok and job.phases:
            self.start(job, job.slot)  # same slot, next phase
            return
        job.slot.busy = False
        job.finished = time.time()
        if ok:
            job.state = "done"
            self.say(f"[green]done[/green] {job.name} in {job.finished - job.started:.0f} s")
            return
        job.state, job.error = "failed", error
        log = job.folder / ("train.log" if phase == "train" else "eval.log")
        from rich.markup import escape  # a log line like "[run] step 3" is not rich markup

        self.say(f"[bold red]failed[/bold red] {job.name} ({phase}): {escape(error)}\n"
                 f"[dim]--- last lines of {log} ---[/dim]\n{escape(log_tail(log))}")
        if self.fail_fast:
            self.say("[red]--fail-fast: stopping the other runs (they stay resumable)[/red]")
            self.stopping = True

    def stop_children(self) -> None:
        """SIGINT (the trainer records `interrupted`), then SIGTERM, then SIGKILL: every run stays resumable."""
        active = [j for j in self.jobs if j.proc is not None]
        for sig, grace in ((signal.SIGINT, TERMINATE_GRACE_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for job in active:
                if job.proc.poll() is None:
                    try:
                        os.killpg(job.proc.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.time() + grace
            while time.time() < deadline and any(j.proc.poll() is None for j in active):
                time.sleep(0.1)
            if all(j.proc.poll() is not None for j in active):
                break
        for job in active:
            job.log_fh.close()
            job.proc = None
            job.slot.busy = False
            job.state = "interrupted"

    # -- the loop

    def run(self) -> None:
        """Start jobs on free slots until the queue is empty; Ctrl-C, SIGTERM or SIGHUP stops every child cleanly."""
        # SIGTERM (a scheduler, kill) and SIGHUP (the terminal closed) stop the grid as Ctrl-C does
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        live = None
        try:
            if console.is_terminal:
                from rich.live import Live

                live = self.live = Live(self.table(), console=console, refresh_per_second=2, transient=False)
                live.start()
            while True:
                for job in self.jobs:
                    if job.proc is not None and (rc := job.proc.poll()) is not None:
                        self.finish(job, rc)
                if self.stopping:
                    self.stop_children()
                    break
                for slot in self.slots:
                    if not slot.busy and self.queue:
                        self.start(self.queue.pop(0), slot)
                if not self.queue and all(j.proc is None for j in self.jobs):
                    break
                if live is not None:
                    live.update(self.table())
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.say("[yellow]interrupted: stopping the running children; every run stays resumable[/yellow]")
            try:
                self.stop_children()
            except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
                for job in self.jobs:
                    if job.proc is not None and job.proc.poll() is None:
                        os.killpg(job.proc.pid, signal.SIGKILL)
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
                          job.slot.label if job.slot and job.proc else "")
        return table

    def progress(self, job: Job) -> tuple[str, str, str]:
        if job.run is None or job.state not in ("train", "eval", "done", "interrupted"):
            return "", "", ""
        row = last_metrics(job.folder / "metrics.jsonl")
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


# ---------------------------------------------------------------------------------------------
# 6. The command


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


def run_ablation(source: str, out: Path = Path("results"), dry_run: bool = False, jobs: int | None = None,
                 devices: str | None = None, overrides: list[str] | None = None, only: str | None = None,
                 fail_fast: bool = False, retry_failed: bool = False, accept_changes: bool = False,
                 seeds: list[int] | None = None, eval_suite: str | None = None) -> int:
    plan = plan_ablation(source, overrides, seeds, eval_suite)
    folder = Path(out) / plan.name
    runs = select_runs(plan.runs, only)
    want = None if plan.eval_suite == "none" else EvalWanted(plan.eval_suite, tuple(plan.eval_settings))

    if dry_run:
        previous = runio.read_json(folder / MANIFEST)
        if isinstance(previous, dict) and any((changes := grid_changes(previous, plan)).values()):
            console.print(f"[yellow]differs from {folder / MANIFEST}[/yellow] (a real run needs --accept-changes or "
                          f"--out):\n{format_changes(changes)}", highlight=False)
        states = {r.name: run_state(folder / r.dir_name, want) for r in runs}
        print_plan(plan, runs, folder, states)
        console.print("dry run: nothing was started.")
        return 0

    if want is not None and not eval_available():
        err_console.print(f"[yellow]warning[/yellow]: `rlp eval` is not available in this installation; training "
                          f"without evaluation (suite '{want.suite}'). Re-run the same command later to evaluate.")
        want = None

    with FolderLock(folder):
        write_manifest(plan, folder, accept_changes)
        jobs_list: list[Job] = []
        skipped_failed, busy = [], []
        if want is not None:
            for model, dirname in base_model_dirs(plan).items():
                base_folder = folder / dirname
                if any(r.config.model.name == model for r in runs) and not eval_done(base_folder, want):
                    if eval_failed(base_folder, want) and not retry_failed:
                        skipped_failed.append(f"{dirname} (eval of {model})")
                        continue
                    jobs_list.append(Job(name=f"{dirname} ({model})", folder=base_folder, phases=["eval"], model=model,
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
            train_done = (runio.read_json(run_folder / "status.json") or {}).get("status") == "completed"
            phases = ([] if train_done else ["train"]) + (["eval"] if want else [])
            jobs_list.append(Job(name=run.name, folder=run_folder, phases=phases, run=run))

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
            slots = make_slots(devices, jobs, len(jobs_list))
            console.print(f"slots: {len(slots)} x {slots[0].label} ({slots[0].env['RLP_NUM_THREADS']} threads each)",
                          highlight=False)
            scheduler = Scheduler(jobs_list, slots, want, fail_fast)
            scheduler.run()

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
        status = runio.read_json(folder / run.dir_name / "status.json") or {}
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
    ):
        """Run an ablation grid: one training run per config, then evaluation; resumable.

        Exit code 0: every run done; 1: some failed or unfinished (named in the summary); 2: bad input."""
        try:
            code = run_ablation(ablation, out, dry_run, jobs, devices, list(set_ or []), only, fail_fast,
                                retry_failed, accept_changes, _parse_seeds(seeds), eval_suite)
        except KeyboardInterrupt:  # typer would turn it into an exit code that `rlp`'s main() drops
            err_console.print("[yellow]interrupted[/yellow]: the children were stopped and every run is resumable; "
                              "run the same command again to continue.")
            sys.exit(130)
        if code:
            sys.exit(code)  # sys.exit, not typer.Exit: with standalone_mode=False click returns Exit's code unused
