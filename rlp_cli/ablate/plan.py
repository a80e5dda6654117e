"""Preset -> plan: every run of the grid, fully resolved and validated. Pure: reads no file, prints nothing.

base config + the preset's `set:` + `--set` + grid/zip/runs + seeds -> one `Run` per resolved TrainConfig, each
with a stable id (a hash of its resolved config) and a folder `<readable-name>-<id>`; FLOP-matched keys are
derived from another arm's config. Also what a plan implies for the results folder: the base-model
evaluations (one per model) and the settings they use.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from rlp_cli.ablate.preset import EvalSpec, Preset
from rlp_cli.config import (TrainConfig, apply_overrides, flatten, parse_override, set_dotted, validation_message,
                            without_tracking)
from rlp_cli.errors import UserError


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
    notes: list[str] = field(default_factory=list)  # things worth telling the user (see expand's `note`)

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
    tree = without_tracking(config.to_dict())  # nor does log.report_to
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


def check_preset(preset: Preset, where: str, name: str, seeds: list[int], cli_overrides: list[str]) -> None:
    """The checks that need no config: names, seeds, keys, axes, arms and their derive rules."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{where}: key 'name' = {name!r} must be a plain folder name. Fix: use letters, digits, . _ -.")
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


def override_notes(preset: Preset, where: str, cli_overrides: list[str]) -> list[str]:
    """An arm's own `set:` wins over --set (a FLOP-matched arm keeps budget.steps: null); say so."""
    notes = []
    for item in cli_overrides:
        key, _ = parse_override(item)
        for arm in preset.runs:
            if key in arm.overrides or key in arm.derive:
                notes.append(f"--set {item} does not apply to arm '{arm.name}', which sets {key} itself ({where}).")
    return notes


def expand(preset: Preset, path: Path, cli_overrides: list[str] | None = None, seeds: list[int] | None = None,
           eval_suite: str | None = None, note: Callable[[str], None] | None = None) -> Plan:
    """Every run of the grid, fully resolved and validated. Order: seed-major, so seed 0 of every arm comes first.

    path: the preset file (names the plan and the errors; not read here: the base config comes from the preset,
    see Preset.base_config). note: called with each note as soon as it is known (the command prints them before
    a later error); they are also kept in Plan.notes."""
    where = str(path)
    name = preset.name or path.stem
    cli_overrides = list(cli_overrides or [])
    seeds = list(seeds if seeds is not None else preset.seeds)
    check_preset(preset, where, name, seeds, cli_overrides)
    notes = override_notes(preset, where, cli_overrides)
    for text in notes if note else []:
        note(text)

    # The base every run starts from: base config, then the preset's `set:`, then --set.
    tree = preset.base_config()
    for key, value in preset.common.items():
        set_dotted(tree, key, copy.deepcopy(value))
    tree = apply_overrides(tree, cli_overrides)
    # Not validated on its own: a base may be incomplete until an axis fills it in (e.g. budget.steps: null).
    base_flat = flatten(TrainConfig().to_dict()) | flatten(tree)

    axis_keys = [*preset.grid, *preset.paired]
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
                cli_overrides=cli_overrides, notes=notes)


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
