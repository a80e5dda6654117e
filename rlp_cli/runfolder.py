"""The files of a run folder, named in one place.

`rlp train CONFIG --out RUN` writes a run folder; `rlp eval RUN` adds the evaluation; `rlp ablate` adds its
logs and the evaluation marker; `rlp report` reads them all:

    RUN/config.yaml           the resolved run config (a resume refuses a different one)
        status.json           running | interrupted | failed | completed, step, pid, totals
        lease.json            while a process trains it: host, pid, refreshed every 30 s (a re-run skips it)
        provenance.json       git commit, package versions, host, the step a resume started from
        metrics.jsonl         one row per step (and the step-0 probe row)
        samples.jsonl         logged thoughts and their rewards, every few steps
        probe.jsonl           the fixed held-out probe, every few steps
        checkpoint/           state.pt (+ state.pt.sha256) while training; removed once final/ is in place
        final/                the trained model (written as final.tmp/, then renamed)
        tensorboard/, wandb/  log.report_to: TensorBoard event files, the W&B run (offline unless logged in)
        trackers.json         log.report_to: the W&B and MLflow run ids, so that a resume continues those runs
        eval.json             `rlp eval`: task accuracy, held-out perplexity and information gain
        eval_samples.jsonl    `rlp eval`: one record per problem and sample
        eval_status.json      `rlp ablate`: which suite and settings eval.json was made with, or why it failed
        train.log, eval.log   `rlp ablate`: the output of its `rlp train` / `rlp eval` children

A base-model evaluation folder (an ablation's base/, `rlp eval MODEL`'s evals/<model>-<suite>/) holds only the
eval files. One level up, an ablation's results folder holds manifest.json (the grid) and .lock; mlruns/, the local
MLflow store of log.report_to: mlflow, sits one level above a run folder too (shared by an ablation's runs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rlp_cli import runio

MANIFEST_FILE = "manifest.json"  # an ablation's results folder: the grid `rlp ablate` records, `rlp report` reads
LOCK_FILE = ".lock"  # an ablation's results folder: held by the `rlp ablate` running on it


@dataclass(frozen=True)
class RunFolder:
    """A run folder (or a base-model evaluation folder): its files by name, and small readers."""

    path: Path

    CONFIG: ClassVar[str] = "config.yaml"
    STATUS: ClassVar[str] = "status.json"
    PROVENANCE: ClassVar[str] = "provenance.json"
    METRICS: ClassVar[str] = "metrics.jsonl"
    SAMPLES: ClassVar[str] = "samples.jsonl"
    PROBE: ClassVar[str] = "probe.jsonl"
    CHECKPOINT: ClassVar[str] = "checkpoint"
    CHECKPOINT_STATE: ClassVar[str] = "state.pt"  # inside checkpoint/
    CHECKPOINT_SUMS: ClassVar[str] = "state.pt.sha256"  # inside checkpoint/: the checksums a resume verifies
    FINAL: ClassVar[str] = "final"
    FINAL_TMP: ClassVar[str] = "final.tmp"
    EVAL: ClassVar[str] = "eval.json"
    EVAL_STATUS: ClassVar[str] = "eval_status.json"
    LEASE: ClassVar[str] = "lease.json"  # while a process trains the run: its host and pid, refreshed (runio.Lease)
    TRAIN_LOG: ClassVar[str] = "train.log"
    EVAL_LOG: ClassVar[str] = "eval.log"
    TENSORBOARD: ClassVar[str] = "tensorboard"  # log.report_to: tensorboard
    TRACKERS: ClassVar[str] = "trackers.json"  # log.report_to: the trackers' own run ids
    MLRUNS: ClassVar[str] = "mlruns"  # log.report_to: mlflow, beside the run folder (one level up)
    TRAINING_LOGS: ClassVar[tuple[str, ...]] = (METRICS, SAMPLES, PROBE)  # the jsonl files a step appends to

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- the files

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def status_file(self) -> Path:
        return self.path / self.STATUS

    @property
    def provenance(self) -> Path:
        return self.path / self.PROVENANCE

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def samples(self) -> Path:
        return self.path / self.SAMPLES

    @property
    def probe(self) -> Path:
        return self.path / self.PROBE

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def checkpoint_state(self) -> Path:
        return self.checkpoint / self.CHECKPOINT_STATE

    @property
    def checkpoint_sums(self) -> Path:
        return self.checkpoint / self.CHECKPOINT_SUMS

    @property
    def final(self) -> Path:
        return self.path / self.FINAL

    @property
    def final_tmp(self) -> Path:
        return self.path / self.FINAL_TMP

    @property
    def eval_json(self) -> Path:
        return self.path / self.EVAL

    @property
    def eval_samples(self) -> Path:
        return samples_beside(self.eval_json)

    @property
    def eval_status_file(self) -> Path:
        return self.path / self.EVAL_STATUS

    @property
    def lease(self) -> Path:
        return self.path / self.LEASE

    def lease_holder(self) -> dict | None:
        """{host, pid, updated} of the process training this run right now, or None (see runio.lease_holder)."""
        return runio.lease_holder(self.lease)

    @property
    def train_log(self) -> Path:
        return self.path / self.TRAIN_LOG

    @property
    def eval_log(self) -> Path:
        return self.path / self.EVAL_LOG

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def trackers(self) -> Path:
        return self.path / self.TRACKERS

    @property
    def mlruns(self) -> Path:
        """The local MLflow store the run shares with its siblings (an ablation's runs: one per ablation)."""
        return self.path.resolve().parent / self.MLRUNS

    def log(self, phase: str) -> Path:
        """The log of an `rlp ablate` child: train.log for the `train` phase, eval.log for `eval`."""
        return self.train_log if phase == "train" else self.eval_log

    # -- readers (a missing or unreadable file reads as empty)

    def read_status(self) -> dict:
        status = runio.read_json(self.status_file)
        return status if isinstance(status, dict) else {}

    @property
    def status(self) -> str | None:
        """running | interrupted | failed | completed, or None when no status.json was written yet."""
        return self.read_status().get("status")

    def read_eval_status(self) -> dict:
        marker = runio.read_json(self.eval_status_file)
        return marker if isinstance(marker, dict) else {}

    def read_eval(self) -> dict:
        ev = runio.read_json(self.eval_json)
        return ev if isinstance(ev, dict) else {}

    def last_metrics(self) -> dict | None:
        """The last complete row of metrics.jsonl, reading only its tail."""
        try:
            with open(self.metrics, "rb") as fh:
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


def samples_beside(eval_json: Path) -> Path:
    """Where `rlp eval` writes the per-sample records of an eval file: eval.json -> eval_samples.jsonl."""
    return eval_json.with_name(eval_json.stem + "_samples.jsonl")
