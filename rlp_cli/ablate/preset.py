"""An ablation file: the preset schema (`Preset`), finding a preset by name, and reading it (with its base config).

This is the only part of planning that reads files; plan.py turns what it reads into runs.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from rlp_cli.config import BUILTIN_CONFIG_DIR, TrainConfig, read_text, read_yaml, set_dotted
from rlp_cli.errors import UserError

# ./ablations/ (the user's own, first: a copy there shadows a built-in) and the built-ins, shipped in the package
PRESET_DIRS = [Path("ablations"), Path(__file__).resolve().parent.parent / "presets"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Derive(Strict):
    # FLOP-match this key to another arm of the same grid point and seed, with RLP_SPEC's approximation
    #   T_flop = n_rollouts * l_seq * batch_size * iters + T_inp
    # computed from that arm's *config* (before anything runs), so ids stay stable; see plan.flop_matched_tokens().
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

    # The named base config file as load_preset read it, or why it could not be read. The error waits until
    # plan.expand asks for the base, so a preset with several mistakes reports them in the same order as ever.
    _base_read: dict | Exception | None = PrivateAttr(default=None)

    def base_config(self) -> dict:
        """The base config as a fresh nested dict: an inline mapping (nested or dotted keys), or the built-in
        config / YAML file named by `base`, as load_preset read it."""
        if isinstance(self.base, dict):
            tree: dict = {}
            for key, value in self.base.items():  # nested mappings and dotted keys both work
                set_dotted(tree, key, copy.deepcopy(value)) if "." in key else tree.__setitem__(key, copy.deepcopy(value))
            return tree
        if isinstance(self._base_read, Exception):
            raise self._base_read
        if self._base_read is None:
            raise ValueError(f"base {self.base!r} was not read: load the preset with load_preset(), or give "
                             "the base config with with_base_config()")
        return copy.deepcopy(self._base_read)

    def with_base_config(self, tree: dict) -> "Preset":
        """This preset with its named base config given as a mapping (a preset built in code, not read from disk)."""
        preset = self.model_copy()
        preset._base_read = copy.deepcopy(tree)
        return preset


# Top-level keys that mark a YAML file as an ablation rather than a run config (for `rlp validate`).
PRESET_ONLY_KEYS = {f.alias or name for name, f in Preset.model_fields.items()} - set(TrainConfig.model_fields)


def preset_paths() -> dict[str, Path]:
    """Presets found in ./ablations and among the built-ins in rlp_cli/presets (the first one wins)."""
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
                     f"{', '.join(_known_preset_keys([]))}; see the built-in presets for commented examples: rlp copy-preset smoke).")


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
    """Read and validate an ablation file (a preset name or a path), and the base config file it names."""
    path = resolve_preset(source)
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level of an ablation must be a mapping (base:, grid:, runs:, seeds:, ...), "
                        f"not {type(tree).__name__}. Fix: see a built-in preset for an example: rlp copy-preset smoke.")
    try:
        preset = Preset.model_validate(tree)
    except ValidationError as e:
        raise _schema_error(e, path) from None
    if isinstance(preset.base, str):
        try:
            preset._base_read = read_base_file(preset.base, path)
        except (UserError, OSError) as e:
            preset._base_read = e
    return preset, path


def read_base_file(base: str, path: Path) -> dict:
    """A named base config: a built-in config name, or a YAML path (relative to the preset file at `path`)."""
    builtin = BUILTIN_CONFIG_DIR / f"{base}.yaml"
    candidate = Path(base)
    if not candidate.is_absolute() and (path.parent / candidate).is_file():
        candidate = path.parent / candidate
    if builtin.is_file() and not candidate.is_file():
        candidate = builtin
    if not candidate.is_file():
        raise UserError(f"{path}: key 'base' = {base!r} is neither a built-in config "
                        f"({', '.join(p.stem for p in BUILTIN_CONFIG_DIR.glob('*.yaml'))}) nor a YAML file. "
                        "Fix: name a built-in config, a path relative to the ablation file, or an inline mapping.")
    tree = read_yaml(candidate) or {}
    if not isinstance(tree, dict):
        raise UserError(f"{candidate}: a run config must be a mapping of settings. "
                        "Fix: see `rlp validate --show-defaults`.")
    return tree
