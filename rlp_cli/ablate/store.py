"""The results folder of an ablation on disk: the manifest (the grid, and the changed-grid check), the folder
lock, and the state of each run folder (new / resume / eval / done / failed / busy).

    OUT/<ablation>/manifest.json   the plan: runs, ids, axes, baseline, eval suite, report layout
                   .lock           held by the `rlp ablate` running on the folder
                   <run>-<id>/     a run folder (rlp_cli/runfolder.py names its files)
                   base/           the untrained model's evaluation (base-<model>/ when the grid varies the model)
"""

from __future__ import annotations

import fcntl
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlp_cli import runio
from rlp_cli.ablate.plan import Plan, base_model_dirs
from rlp_cli.config import TRACKING_KEYS, flatten
from rlp_cli.errors import UserError
from rlp_cli.runfolder import LOCK_FILE, MANIFEST_FILE, RunFolder

# ---------------------------------------------------------------------------------------------
# The manifest and the changed-grid check


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


def read_manifest(folder: Path):
    """The manifest.json in a results folder as JSON (None when missing or unreadable)."""
    return runio.read_json(folder / MANIFEST_FILE)


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
            keys = sorted(k for k in set(before) | set(after) if k not in ("name", *TRACKING_KEYS)
                          and before.get(k) != after.get(k))
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


def write_manifest(plan: Plan, folder: Path, accept_changes: bool,
                   accepted: Callable[[dict[str, list[str]]], None] | None = None) -> None:
    """Record the grid; refuse a changed grid unless --accept-changes (old runs stay on disk as `retired`).

    accepted: called with the changes of an accepted changed grid, before the manifest is written."""
    path = folder / MANIFEST_FILE
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
                    f"{folder}: the grid of '{plan.name}' differs from the one recorded in {MANIFEST_FILE} "
                    f"(fingerprint {previous.get('fingerprint')} -> {plan.fingerprint}):\n{format_changes(changes)}\n"
                    "Refusing to mix two grids in one folder. Fix: pass --out <another folder> to run the new grid "
                    "apart, or --accept-changes to adopt it here (finished runs of the old grid stay on disk and are "
                    "listed under retired_runs in the manifest).")
            retired += [r | {"retired": runio.now()} for r in previous.get("runs", []) if r["id"] not in new_ids]
            if accepted is not None:
                accepted(changes)
    manifest["retired_runs"] = retired
    runio.write_json(path, manifest)


class FolderLock:
    """fcntl.flock on <folder>/.lock: a second `rlp ablate` on the same folder refuses instead of corrupting it."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
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
# A run folder's state


@dataclass(frozen=True)
class EvalWanted:
    """The evaluation a run should end with: `rlp eval --suite SUITE --set SETTINGS...`."""

    suite: str
    settings: tuple[str, ...] = ()

    def marker(self, ok: bool, error: str = "") -> dict:
        """What eval_status.json records after an evaluation."""
        return {"status": "completed" if ok else "failed", "suite": self.suite, "settings": list(self.settings),
                "updated": runio.now(), **({"error": error} if error else {})}

    def matches(self, marker: dict) -> bool:
        return marker.get("suite") == self.suite and list(marker.get("settings", [])) == list(self.settings)


def write_eval_marker(folder: Path, want: EvalWanted, ok: bool, error: str = "") -> None:
    runio.write_json(RunFolder(folder).eval_status_file, want.marker(ok, error))


def eval_done(folder: Path, want: EvalWanted) -> bool:
    """eval.json is there and was made with this suite and settings (per the runner's eval_status.json, else
    per eval.json itself, for an evaluation someone ran by hand)."""
    run = RunFolder(folder)
    if not run.eval_json.is_file():
        return False
    marker = runio.read_json(run.eval_status_file)
    if marker is not None:
        return want.matches(marker) and marker.get("status") == "completed"
    made_with = run.read_eval().get("suite")
    return not isinstance(made_with, dict) or made_with.get("name") == want.suite


def eval_failed(folder: Path, want: EvalWanted) -> bool:
    marker = RunFolder(folder).read_eval_status()
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


def train_done(folder: Path) -> bool:
    return RunFolder(folder).status == "completed"


def run_state(folder: Path, want: EvalWanted | None) -> str:
    """new | resume | eval | done | failed | busy.

    want None: no evaluation is wanted (or `rlp eval` is not available)."""
    run = RunFolder(folder)
    status = run.read_status()
    state = status.get("status")
    if state == "completed":
        if want is None or eval_done(folder, want):
            return "done"
        return "failed" if eval_failed(folder, want) else "eval"
    here = status.get("host", platform.node()) == platform.node()  # a pid means something only on its own host
    if run.lease_holder() or (state == "running" and here and _rlp_process_alive(status.get("pid"))):
        return "busy"  # a process (here, or on another node of the cluster) is training it right now
    if state == "failed":
        return "failed"
    if state in ("running", "interrupted") or run.checkpoint.exists():
        return "resume"
    return "new"
