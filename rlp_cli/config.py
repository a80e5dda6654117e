"""The run config: one YAML file is the single source of truth for reproducing a run.

`load_config(source, overrides)` reads a built-in config name (see `rlp_cli/configs/`) or a YAML path,
applies `key.sub=value` overrides, validates everything with pydantic and turns every mistake into
a one-paragraph `UserError` that names the file, the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from rlp_cli.errors import UserError

BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # log.report_to
# Where the metrics go, not what is trained: a run's identity (its id in an ablation, the check that a resumed
# folder holds the same run) leaves these keys out, so turning a tracker on or off keeps every run and its folder.
TRACKING_KEYS = ("log.report_to",)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    # tiny | smollm2-135m | a local Hugging Face directory | a .gguf file | a hub id already in the local cache
    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataConfig(Strict):
    # reasoning | reasoning-answers | arithmetic | general | a path (or list of paths) to .txt / .jsonl /
    # .parquet files or folders of them (`rlp ls corpora` describes the built-in ones)
    corpus: str | list[str] = "reasoning"
    text_field: str = "text"  # .jsonl / .parquet column holding the document text
    txt_split: Literal["file", "blank_line"] = "blank_line"  # a .txt file is one document, or one per blank-line block
    num_documents: int = 2000  # size of a built-in corpus
    max_context_tokens: int = 128  # documents are cut into windows of at most this many tokens
    min_prefix_tokens: int = 8  # a scored position has at least this much context before it
    heldout_fraction: float = 0.05  # by document hash, so the split is the same for every run
    # which next-token positions get a thought (RLP_SPEC section 4); `answer`: the first non-blank token
    # after answer_marker (documents without the marker fall back to random_one)
    positions: Literal["random_one", "stride", "all", "surprise", "answer"] = "random_one"
    answer_marker: str = "Answer:"
    stride: int = 16
    surprise_k: int = 1  # `surprise`: the k positions with the lowest EMA log-prob
    max_positions_per_document: int = 4  # caps `stride` / `all` so a step stays bounded

    @field_validator("heldout_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v


class ObjectiveConfig(Strict):
    # rlp: thoughts rewarded by information gain; rpt: thoughts + a written prediction rewarded by a
    # match; ntp: plain next-token continued pretraining (the paper's CPT baseline)
    name: Literal["rlp", "rpt", "ntp"] = "rlp"
    reward: str | None = None  # a name from `rlp ls rewards`; default info_gain (rlp) / prefix_match (rpt)
    num_rollouts: int = 4  # G thoughts per context
    thought_tokens: int = 32  # maximum thought length (the paper's "completion length")
    temperature: float = 0.7
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_beta: float = 0.0  # token-level KL to the frozen initial model; the paper finds 0 best
    ema_tau: float = 0.999
    horizon: int = 1  # info_gain over the next H tokens, discounted by gamma (1 = the paper's reward)
    gamma: float = 0.7
    prediction_tokens: int = 8  # rpt: how many tokens the model writes as its prediction after </think>
    thought_prompt: str = ""  # text placed before the context (the paper's v2 instruction); S_ema sees it too
    # after </think>, restate the last k context tokens (teacher-forced: no reward, no gradient) before x_t
    # is scored; 0 = the paper's literal format (docs/method.md measures what each costs)
    restate_tokens: int = 0
    # policy updates per sampled batch; > 1 re-uses the batch (ratios leave 1 and the clip of eq. 8 acts)
    num_iterations: int = 1

    @model_validator(mode="after")
    def _check(self) -> "ObjectiveConfig":
        if self.name != "ntp" and self.num_rollouts < 2:
            raise ValueError("num_rollouts must be at least 2: advantages are relative to the group mean")
        if self.thought_tokens < 1 or self.horizon < 1 or self.prediction_tokens < 1 or self.num_iterations < 1:
            raise ValueError("thought_tokens, horizon, prediction_tokens and num_iterations must be at least 1")
        if self.restate_tokens < 0:
            raise ValueError("restate_tokens must be 0 (the paper's format) or more")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0.0 < self.ema_tau <= 1.0:
            raise ValueError("ema_tau must be in (0, 1]")
        return self

    def reward_name(self) -> str:
        if self.reward is not None:
            return self.reward
        return {"rlp": "info_gain", "rpt": "prefix_match", "ntp": "none"}[self.name]


class OptimConfig(Strict):
    lr: float = 1e-6
    lr_end: float | None = None  # linear decay to this value over budget.steps (the paper's CPT: 1e-6 -> 1e-7)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_documents: int = 4  # documents per step; each gives one or more contexts


class BudgetConfig(Strict):
    steps: int | None = 20
    input_tokens: int | None = None  # document tokens consumed (the paper's "250M tokens" axis)

    @model_validator(mode="after")
    def _one_budget(self) -> "BudgetConfig":
        if self.steps is None and self.input_tokens is None:
            raise ValueError("set budget.steps or budget.input_tokens (or both: the first reached stops the run)")
        return self


class LogConfig(Strict):
    samples_every: int = 5  # write thoughts and their rewards to samples.jsonl every N steps
    checkpoint_every: int = 10  # 0 disables resumable checkpoints
    save_final: bool = True  # write final/ (loadable by AutoModelForCausalLM.from_pretrained)
    # The held-out probe: the same positions, scored with the same sampling seed, before training and
    # every probe_every steps (probe.jsonl, probe/* metrics). Identical across seeds and arms of a grid
    # with the same corpus, so runs compare position by position. 0 disables it.
    probe_every: int = 10
    probe_contexts: int = 32
    probe_rollouts: int = 4
    probe_seed: int = 0
    # Experiment trackers that get every metrics.jsonl row too (rlp_cli/trackers.py): tensorboard, wandb, mlflow,
    # trackio; a list, or one name. Local by default (W&B offline unless logged in). Not part of a run's identity.
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = []

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):  # `report_to: wandb`, --set log.report_to=wandb,mlflow, TRL's `none`
            v = [] if v.strip() == "none" else [n.strip() for n in v.split(",") if n.strip()]
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"expected a tracker's name or a list of them ({', '.join(TRACKERS)})")
        for name in v:
            if name not in TRACKERS:
                close = difflib.get_close_matches(str(name), TRACKERS, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown tracker {name!r} ({hint}known: {', '.join(TRACKERS)})")
        return list(dict.fromkeys(v))  # each once, in the order given


class TrainConfig(Strict):
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; None = the RLP_NUM_THREADS env var, else all cores
    fast_path: bool = True  # False: re-encode prefix+thought for every scoring (the reference path)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    budget: BudgetConfig = BudgetConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _restate_fits(self) -> "TrainConfig":
        if self.objective.restate_tokens > self.data.min_prefix_tokens:
            raise ValueError(f"objective.restate_tokens ({self.objective.restate_tokens}) cannot exceed "
                             f"data.min_prefix_tokens ({self.data.min_prefix_tokens}): every scored position "
                             "must have that many context tokens to restate")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))


MAX_CONFIG_BYTES = 1 << 20  # a config or preset is a page of YAML; a bigger file is a wrong path, not a config


def read_text(path: Path) -> str:
    """A config file's text: UTF-8 and at most 1 MiB, or a UserError naming the file and the fix."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {size / 2**20:.1f} MiB is too large for a config or preset (the limit is "
                        f"{MAX_CONFIG_BYTES / 2**20:.0f} MiB). Fix: check the path; data belongs in data.path, "
                        "not in the config.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); is it a binary file or "
                        "saved in another encoding? Fix: check the path, or re-save the file as UTF-8.") from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing file or malformed YAML becomes a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: file not found. Fix: check the path, or name a built-in config "
                        f"({', '.join(builtin_config_names())}).")
    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}. Fix: correct the YAML syntax there "
                        "(indentation with spaces, `key: value` pairs, quoted strings containing ':').") from None


def resolve_config_source(source: str) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    builtin = BUILTIN_CONFIG_DIR / f"{source}.yaml"
    if builtin.is_file():
        return builtin
    raise UserError(f"config '{source}' is neither a YAML file nor a built-in config. Fix: pass a path to a "
                    f".yaml file or one of: {', '.join(builtin_config_names())}.")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"--set '{item}': expected key=value, e.g. --set objective.num_rollouts=8.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the dotted keys --set and the reports use."""
    out: dict[str, Any] = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def without_tracking(tree: dict) -> dict:
    """A copy of a config tree (TrainConfig.to_dict(), a config.yaml) without TRACKING_KEYS."""
    tree = copy.deepcopy(tree)
    for key in TRACKING_KEYS:
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return tree


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return tree


def _known_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def validation_message(err: ValidationError, model_cls: type[BaseModel], origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(model_cls, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else \
                f"known keys here: {', '.join(known)}"
            parts.append(f"key '{key}' is not a known setting ({hint})")
        elif e["type"] == "missing":
            parts.append(f"key '{key}' is required")
        elif not loc:  # a check across sections: the message names its keys
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            got = e.get("input")
            parts.append(f"key '{key}' = {got!r}: {e['msg']}")
    return (f"{origin}: invalid config: " + "; ".join(parts) +
            ". Fix: correct these keys in the file or in --set (every setting and its default: "
            "`rlp validate --show-defaults`).")


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> TrainConfig:
    if isinstance(source, dict):
        tree, origin = dict(source), "config"
    else:
        path = resolve_config_source(str(source))
        tree = read_yaml(path)
        origin = str(path)
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise UserError(f"{origin}: the top level must be a mapping of settings (model:, data:, objective:, "
                            f"...), not a {type(tree).__name__}. Fix: see `rlp validate --show-defaults`.")
    tree = apply_overrides(tree, overrides)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(validation_message(e, TrainConfig, origin)) from None
