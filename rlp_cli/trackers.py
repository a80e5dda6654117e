"""Experiment trackers (`log.report_to`): every row of metrics.jsonl also goes to TensorBoard, W&B, MLflow or Trackio.

    trackers = open_trackers(config, run_folder, resumed_step)   # rank 0, once the Trainer exists
    trackers.log(step, metrics)                                  # every metrics.jsonl row, the step-0 probe row too
    trackers.close("completed" | "interrupted" | "failed")

The names are metrics.jsonl's (TRL's `loss`, `reward`, `rewards/<name>/mean`, ... plus `rlp/*`, `probe/*`,
`time/*`); `step` is the x axis; None, NaN, infinities and non-numbers are skipped. Nothing leaves the machine
unless the user set it up:
    tensorboard  event files in <run>/tensorboard/ (`tensorboard --logdir results/<ablation>` shows a whole grid)
    wandb        <run>/wandb/, offline unless logged in (WANDB_API_KEY, or a key from `wandb login` in ~/.netrc) or
                 WANDB_MODE is set; project $WANDB_PROJECT or `rlp`, run name = config name, group = the ablation
    mlflow       $MLFLOW_TRACKING_URI, else the file store <run>/../mlruns (an ablation's runs share one; rlp sets
                 MLFLOW_ALLOW_FILE_STORE=true, which MLflow 3 asks for); experiment $MLFLOW_EXPERIMENT_NAME, else the
                 ablation's (or the config's) name, tag rlp.group; params = the flattened config; a metric name
                 with a character MLflow refuses has it replaced by `_` (metrics.jsonl's names all pass as they are)
    trackio      Trackio's local store ($TRACKIO_DIR, else ~/.cache/huggingface/trackio); project = the ablation's
                 (or the config's) name, group = the ablation
`rlp ablate` sets RLP_TRACKER_GROUP=<ablation name> for its runs (set it yourself to group runs of `rlp train`).
A resumed run continues its W&B, MLflow and Trackio run (ids in <run>/trackers.json) and TensorBoard drops the
events after the checkpoint, as metrics.jsonl does. A tracker whose library is missing is a UserError naming the
pip extra; any other failure of a tracker is one warning, and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from rlp_cli import runio
from rlp_cli.config import TrainConfig, flatten, without_tracking
from rlp_cli.errors import UserError
from rlp_cli.runfolder import RunFolder

GROUP_ENV = "RLP_TRACKER_GROUP"  # `rlp ablate` sets it to the ablation's name


@dataclass
class RunInfo:
    """What a tracker needs to know about the run it reports."""

    config: TrainConfig
    folder: RunFolder
    group: str | None  # the ablation this run belongs to
    resumed_step: int | None  # the checkpoint a resume starts from; None for a fresh run
    ids: dict = field(default_factory=dict)  # trackers.json: each tracker's own run id, for a resume

    @property
    def project(self) -> str:
        return self.group or self.config.name


class TensorBoard:
    def __init__(self, run: RunInfo):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from tensorboardX import SummaryWriter
        # a resume drops the events the interrupted process wrote after its checkpoint (purge_step)
        purge = None if run.resumed_step is None else run.resumed_step + 1
        self.writer = SummaryWriter(log_dir=str(run.folder.tensorboard), purge_step=purge, flush_secs=10)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


def wandb_mode() -> str | None:
    """None (wandb decides) when WANDB_MODE is set; online when logged in; offline otherwise."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:  # where `wandb login` keeps the key; reading it contacts nothing
        return "online" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandB:
    def __init__(self, run: RunInfo):
        import wandb

        previous = run.ids.get("wandb") if run.resumed_step is not None else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "rlp", name=run.config.name, group=run.group,
                              config=run.config.to_dict(), dir=str(run.folder.path), mode=wandb_mode(),
                              id=previous, resume="allow" if previous else None,
                              settings=wandb.Settings(console="off"))  # train.log keeps the output
        run.ids["wandb"] = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


def mlflow_key(name: str) -> str:
    """MLflow allows letters, digits, `_ - . / :` and spaces, and no name that a path would normalize (`a//b`):
    metrics.jsonl's names pass unchanged; any other character becomes `_`."""
    name = re.sub(r"[^\w./ :-]", "_", name)
    if posixpath.normpath(name) != name or name.startswith(("/", ".")):
        name = name.replace("/", "_").lstrip(".") or "_"
    return name


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on a file, so that the runs of an ablation set up one local store one at a time."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


class MLflow:
    STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(self, run: RunInfo):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        uri = os.environ.get("MLFLOW_TRACKING_URI") or run.folder.mlruns.as_uri()
        parsed = urlparse(uri)
        local = Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None
        if local is not None:  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        previous = run.ids.get("mlflow") or {}
        self.run_id = None
        # the runs of an ablation share the store: the first one creates it and the experiment, the others wait
        with _locked(local.parent / f".{local.name}.lock") if local is not None else contextlib.nullcontext():
            self.client = MlflowClient(uri)
            if run.resumed_step is not None and previous.get("tracking_uri") == uri:
                with contextlib.suppress(Exception):  # deleted meanwhile: a new run
                    self.run_id = self.client.get_run(previous["run_id"]).info.run_id
                    self.client.update_run(self.run_id, status="RUNNING")
            if self.run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.project
                found = self.client.get_experiment_by_name(name)
                experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        if self.run_id is None:
            tags = {"rlp.run_folder": str(run.folder.path.resolve()), **({"rlp.group": run.group} if run.group else {})}
            self.run_id = self.client.create_run(experiment, run_name=run.config.name, tags=tags).info.run_id
            params = [Param(mlflow_key(k), str(v)[:MAX_PARAM_VAL_LENGTH])
                      for k, v in flatten(without_tracking(run.config.to_dict())).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        run.ids["mlflow"] = {"tracking_uri": uri, "run_id": self.run_id}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in scalars.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FAILED"))


class Trackio:
    def __init__(self, run: RunInfo):
        import trackio

        resume = "allow" if run.resumed_step is not None else "never"  # a fresh run never adds to an old one
        self.run = trackio.init(project=run.project, name=run.config.name, group=run.group,
                                config=run.config.to_dict(), resume=resume, embed=False)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self, status: str) -> None:
        import trackio

        trackio.finish()  # the run trackio.init() made current: ours


# name in log.report_to -> (class, the modules it can use, the package to install)
_TRACKERS = {
    "tensorboard": (TensorBoard, ("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (WandB, ("wandb",), "wandb"),
    "mlflow": (MLflow, ("mlflow",), "mlflow-skinny"),
    "trackio": (Trackio, ("trackio",), "trackio"),
}


def check_installed(names: list[str]) -> None:
    """A UserError naming the fix for the first tracker whose library is not installed."""
    for name in names:
        _, modules, package = _TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise UserError(f"log.report_to: '{name}' needs the {package} package, which is not installed in this "
                            f"Python environment ({sys.executable}). Fix: pip install 'rlp-cli[{name}]' (or pip "
                            f"install {package}), or remove '{name}' from log.report_to.")


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics row, as metrics.jsonl has them (not its `step`, no None, NaN or infinity)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars, 0-d tensors
            value = value.item()
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class Trackers:
    """The trackers of one run; a failing tracker warns once and is dropped, the run goes on."""

    def __init__(self, opened: dict[str, object] | None = None):
        self.active = dict(opened or {})

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = scalars(metrics)
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(step, row)
            except Exception as e:
                self._drop(name, f"at step {step}", e)

    def close(self, status: str) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.close(status)
            except Exception as e:
                self._drop(name, "while closing", e)
        self.active.clear()

    def _drop(self, name: str, when: str, error: Exception) -> None:
        self.active.pop(name, None)
        warn(f"{name} failed {when} ({type(error).__name__}: {error}); the run goes on without it "
             "(metrics.jsonl has every metric).")


def warn(message: str) -> None:
    print(f"warning: log.report_to: {message}", file=sys.stderr, flush=True)


def open_trackers(config: TrainConfig, run_folder: str | Path, resumed_step: int | None = None,
                  group: str | None = None) -> Trackers:
    """Start the trackers of config.log.report_to for the run in run_folder (group: default $RLP_TRACKER_GROUP)."""
    names = config.log.report_to
    if not names:
        return Trackers()
    check_installed(names)
    folder = RunFolder(run_folder)
    ids = (runio.read_json(folder.trackers) if resumed_step is not None else None) or {}
    run = RunInfo(config, folder, group or os.environ.get(GROUP_ENV) or None, resumed_step, dict(ids))
    opened = {}
    for name in names:
        try:
            opened[name] = _TRACKERS[name][0](run)
        except Exception as e:
            warn(f"{name} could not start ({type(e).__name__}: {e}); the run goes on without it.")
    if run.ids != ids:
        try:
            runio.write_json(folder.trackers, run.ids)
        except OSError as e:
            warn(f"could not write {folder.trackers} ({e}); a resume will start new tracker runs.")
    return Trackers(opened)
