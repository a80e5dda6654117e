"""Faults on purpose: each test injects one fault and checks the promise made to the user.

The promise: a clear one-paragraph error and the right exit code (2 bad input, 1 the run could not go
on, 130 interrupted); status.json says `failed` or `interrupted` and why; no temporary file is left;
nothing already written is lost; every file parses as strict JSON; and the same command run again
finishes the work with every step logged exactly once. README "Reliability" lists these tests.

Moments are chosen by state, never by timing: a signal is sent once the run has logged some steps,
and a kill -9 "during a checkpoint write" is a failpoint (rlp_cli/faults.py) at that exact line.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlp_cli import cli, runio
from rlp_cli.runio import sha256_of

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RLP_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("RLP_FAILPOINT", None)
RLP = [sys.executable, "-m", "rlp_cli.cli"]
SHORT = ["--set", "budget.steps=6", "--set", "log.checkpoint_every=2", "--no-progress"]


def _reject(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict_rows(path: Path) -> list[dict]:
    """Every line parses as strict JSON (no NaN, no torn line)."""
    return [json.loads(line, parse_constant=_reject) for line in path.read_text().splitlines()]


def steps(folder: Path) -> list[int]:
    return [row["step"] for row in strict_rows(folder / "metrics.jsonl")]


def assert_clean(folder: Path) -> None:
    """No temporary file anywhere, and every JSON file of the folder parses strictly."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.parts], \
        sorted(str(p) for p in folder.rglob("*tmp*"))
    for path in folder.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=_reject)
    for path in folder.rglob("*.jsonl"):
        strict_rows(path)


def in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`rlp ARGS` in this process (so a fault can be monkeypatched in): exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["rlp", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    return exit_info.value.code, " ".join(err.split())


def status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def checkpoint_step(folder: Path) -> int:
    path = folder / "checkpoint" / "state.pt"
    assert sha256_of(path) in (folder / "checkpoint" / "state.pt.sha256").read_text().split()
    return torch.load(path, weights_only=False)["step"]


def wait_for_steps(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = folder / "metrics.jsonl"
        if path.exists() and len(runio.read_jsonl(path)) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{folder} never logged {n} steps (exit code {proc.poll()})")


def first_run_started(grid: Path, driver: subprocess.Popen, timeout: float = 120) -> Path:
    """The folder of the first run of `rlp ablate` that has logged a step."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        found = list(grid.glob("*/metrics.jsonl"))
        if found:
            return found[0].parent
        time.sleep(0.02)
    raise AssertionError(f"no run of {grid} logged a step (exit code {driver.poll()})")


def processes_naming(path: Path) -> list[int]:
    """Processes other than this one whose command line holds `path` (a zombie's command line is empty)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # it ended while we looked
                pass
    return pids


def all_gone(path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while processes_naming(path):
        assert time.time() < deadline, f"processes of {path} outlived a kill -9: {processes_naming(path)}"
        time.sleep(0.05)


def interrupted_at_step_3(tmp_path, monkeypatch, capsys) -> Path:
    """A run stopped by Ctrl-C during step 3: its checkpoint is from step 2."""
    from rlp_cli.train import Trainer

    step = Trainer.train_step

    def stop_at_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", stop_at_3)
    run = tmp_path / "run"
    assert in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)[0] == 130
    monkeypatch.setattr(Trainer, "train_step", step)
    assert status(run)["status"] == "interrupted" and checkpoint_step(run) == 2 and steps(run) == [0, 1, 2]
    return run


# --------------------------------------------------------------------------------------------
# Bad config files: exit 2, one paragraph naming the file and the fix


@pytest.mark.parametrize("command,kind", [("validate", "binary"), ("train", "binary"), ("ablate", "binary"),
                                          ("validate", "huge"), ("ablate", "huge"), ("ablate", "empty")])
def test_a_bad_config_file_is_a_clear_error(tmp_path, monkeypatch, capsys, command, kind):
    path = tmp_path / f"{kind}.yaml"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe name: x\n")
    elif kind == "huge":
        path.write_text("".join(f"key{i}: {i}\n" for i in range(120_000)))
    else:
        path.write_text("")
    extra = ["--dry-run"] if command == "ablate" else []
    code, err = in_process(monkeypatch, capsys, command, path, *extra)
    assert code == 2 and str(path) in err and "Fix:" in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("runs")) and not list(tmp_path.glob("results"))


def test_an_empty_run_config_means_every_default(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.yaml").write_text("")
    monkeypatch.setattr(sys, "argv", ["rlp", "validate", str(tmp_path / "empty.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0 and "valid" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# A full or failing disk: exit 1, status failed, no temporary file, the last checkpoint intact


def test_disk_full_while_a_checkpoint_is_written(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_until_full(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of step 4: part of it lands, then the disk is full
            fh.write(b"PK\x03\x04" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    run = tmp_path / "run"
    code, err = in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)
    assert code == 1 and "no space left on the device" in err and "Fix:" in err and "Traceback" not in err, err
    assert status(run)["status"] == "failed" and status(run)["step"] == 4
    assert "no space left" in status(run)["error"]
    assert_clean(run)
    assert checkpoint_step(run) == 2 and steps(run) == [0, 1, 2, 3, 4]

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes
    assert in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)[0] == 0
    assert status(run)["status"] == "completed" and steps(run) == list(range(7))
    assert_clean(run)


class CtrlCMidway:
    """A file whose third write is cut by Ctrl-C, as when the signal handler raises inside one of torch's writes."""

    def __init__(self, fh):
        self.fh, self.writes = fh, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_ctrl_c_while_a_checkpoint_is_written(tmp_path, monkeypatch, capsys):
    """torch's zip writer then fails while closing (RuntimeError "unexpected pos"): the run is still interrupted,
    not failed, and the checkpoint before stays the one to resume from."""
    real_save, calls = torch.save, []

    def save_cut_by_ctrl_c(obj, fh, *args, **kwargs):
        calls.append(1)
        return real_save(obj, CtrlCMidway(fh) if len(calls) == 2 else fh, *args, **kwargs)  # step 4's checkpoint

    monkeypatch.setattr(torch, "save", save_cut_by_ctrl_c)
    run = tmp_path / "run"
    code, err = in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)
    assert code == 130 and "Traceback" not in err, err
    assert status(run)["status"] == "interrupted"
    assert_clean(run)
    assert checkpoint_step(run) == 2 and steps(run) == [0, 1, 2, 3, 4]

    monkeypatch.setattr(torch, "save", real_save)
    assert in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)[0] == 0
    assert status(run)["status"] == "completed" and steps(run) == list(range(7))
    assert_clean(run)


def test_io_error_in_the_middle_of_a_metrics_line(tmp_path, monkeypatch, capsys):
    real_write, appends = os.write, []

    def half_then_eio(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            appends.append(1)
            if len(appends) == 4:  # the row of step 3: half of it lands, then the device fails
                real_write(fd, bytes(data[:len(data) // 2]))
                raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_eio)
    run = tmp_path / "run"
    code, err = in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)
    assert code == 1 and "input/output error" in err and "Traceback" not in err, err
    assert status(run)["status"] == "failed" and steps(run) == [0, 1, 2]  # no half row left behind
    assert_clean(run)
    monkeypatch.undo()
    assert in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)[0] == 0
    assert steps(run) == list(range(7))


def test_disk_full_while_the_final_model_is_saved(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def full(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    real = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    run = tmp_path / "run"
    code, err = in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)
    assert code == 1 and "no space left" in err and "Traceback" not in err, err
    assert status(run)["status"] == "failed" and not (run / "final").exists()
    assert checkpoint_step(run) == 6  # the trained steps are kept: a re-run only retries the save
    assert_clean(run)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)[0] == 0
    assert steps(run) == list(range(7)) and (run / "final" / "model.safetensors").stat().st_size > 1000
    assert json.loads((run / "provenance.json").read_text())["resumed_from_step"] == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_on_a_real_small_file_system(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = mount / "run"
        r = subprocess.run(RLP + ["train", "tiny", "--out", str(run)] + SHORT, env=ENV, capture_output=True, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "no space left on the device" in " ".join(r.stderr.split())
        assert status(run)["status"] == "failed"
        assert_clean(run)
        kept = steps(run)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)  # space freed
        r = subprocess.run(RLP + ["train", "tiny", "--out", str(run)] + SHORT, env=ENV, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert steps(run) == list(range(7)) and kept == list(range(len(kept)))
    finally:
        subprocess.run(["umount", "-l", str(mount)])


# --------------------------------------------------------------------------------------------
# A damaged run folder: never a silent wrong resume


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_corrupt_checkpoint_is_refused(tmp_path, monkeypatch, capsys, damage):
    run = interrupted_at_step_3(tmp_path, monkeypatch, capsys)
    path = run / "checkpoint" / "state.pt"
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF  # torch.load would read this one without complaint
    else:
        data = data[:len(data) // 3]
    path.write_bytes(bytes(data))
    before = (run / "metrics.jsonl").read_text()
    code, err = in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)
    assert code == 2 and "checkpoint is corrupt" in err and "Fix:" in err and "Traceback" not in err, err
    assert status(run)["status"] == "failed"
    assert path.read_bytes() == bytes(data) and (run / "metrics.jsonl").read_text() == before  # nothing changed


def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path, monkeypatch, capsys):
    run = interrupted_at_step_3(tmp_path, monkeypatch, capsys)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 0.12')  # a kill in the middle of a write
    assert in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)[0] == 0
    assert steps(run) == list(range(7))
    assert_clean(run)


def test_a_nan_at_a_chosen_step_fails_there_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    from rlp_cli.train import Trainer

    step = Trainer.train_step

    def poison_before_step_3(self):
        if self.step == 2:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", poison_before_step_3)
    run = tmp_path / "run"
    code, err = in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)
    assert code == 1 and "step 3: non-finite" in err and "Traceback" not in err, err
    assert status(run)["status"] == "failed" and status(run)["step"] == 3
    assert steps(run) == [0, 1, 2] and checkpoint_step(run) == 2
    assert_clean(run)
    monkeypatch.setattr(Trainer, "train_step", step)
    assert in_process(monkeypatch, capsys, "train", "tiny", "--out", run, *SHORT)[0] == 0  # resumes at step 2
    assert steps(run) == list(range(7))


# --------------------------------------------------------------------------------------------
# kill -9 at an exact moment (failpoints), then the same command


@pytest.mark.parametrize("point", ["checkpoint-tmp-written@4", "checkpoint-renamed@4", "final-tmp-written",
                                   "final-renamed"])
def test_kill_9_between_two_writes_then_the_same_command_finishes(tmp_path, monkeypatch, capsys, point):
    run = tmp_path / "run"
    cmd = RLP + ["train", "tiny", "--out", str(run)] + SHORT
    killed = subprocess.run(cmd, env={**ENV, "RLP_FAILPOINT": point}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert status(run)["status"] == "running"
    leftover = {"checkpoint-tmp-written@4": run / "checkpoint" / "state.pt.tmp",
                "final-tmp-written": run / "final.tmp"}.get(point)
    assert leftover is None or leftover.exists()  # the failpoint hit where it says
    assert checkpoint_step(run) == (2 if point == "checkpoint-tmp-written@4" else 4)

    assert in_process(monkeypatch, capsys, *cmd[3:])[0] == 0  # the same command, in this process to save a start-up
    assert status(run)["status"] == "completed" and steps(run) == list(range(7))
    assert_clean(run)
    assert (run / "final" / "config.json").exists() and not (run / "checkpoint").exists()


GRID = """
base: tiny
seeds: [0, 1]
set: {budget.steps: 20, log.checkpoint_every: 2, log.probe_every: 10}
"""


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_at_a_random_moment_of_a_grid(tmp_path, trial):
    """kill -9 of `rlp ablate` and of its training child at a seeded random moment, then the same command."""
    (tmp_path / "grid.yaml").write_text(GRID)
    cmd = RLP + ["ablate", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "res"), "--eval", "none",
                 "--jobs", "1"]
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "res" / "grid"
    first_run_started(folder, driver)
    time.sleep(random.Random(trial).uniform(0.0, 2.0))  # anywhere in the first run, or into the second
    # kill -9 of the driver and of every child it has started, even one that has not yet written its status
    for pid in processes_naming(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    driver.wait()
    all_gone(tmp_path)  # a dying child must not still be writing when the rerun reads its folder

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = [f for f in folder.iterdir() if f.is_dir()]
    assert len(runs) == 2
    for run in runs:
        assert status(run)["status"] == "completed" and steps(run) == list(range(21))
        assert_clean(run)
    json.loads((folder / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------
# Signals: SIGINT (Ctrl-C), SIGTERM (a scheduler), SIGHUP (the terminal closed)

LONG = ["--set", "budget.steps=40", "--set", "log.checkpoint_every=2", "--no-progress"]
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_to_rlp_train_leaves_it_interrupted_and_resumable(tmp_path, monkeypatch, capsys, sig):
    run = tmp_path / "run"
    cmd = RLP + ["train", "tiny", "--out", str(run)] + LONG
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run, 4, proc)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert status(run)["status"] == "interrupted"
    assert_clean(run)
    if sig == signal.SIGHUP:  # one resume is enough to show the folder is whole
        assert in_process(monkeypatch, capsys, *cmd[3:])[0] == 0 and steps(run) == list(range(41))


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_to_rlp_ablate_stops_its_runs_resumably(tmp_path, sig):
    (tmp_path / "grid.yaml").write_text("base: tiny\nseeds: [0]\nset: {budget.steps: 40, log.checkpoint_every: 2}\n")
    cmd = RLP + ["ablate", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "res"), "--eval", "none"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = first_run_started(tmp_path / "res" / "grid", proc)
    wait_for_steps(run, 4, proc)
    child = status(run)["pid"]
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert status(run)["status"] == "interrupted" and not Path(f"/proc/{child}").exists()
    assert_clean(run)
    if sig == signal.SIGHUP:
        again = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        assert again.returncode == 0 and steps(run) == list(range(41)), again.stdout + again.stderr


# --------------------------------------------------------------------------------------------
# Readers beside a writer


def test_rlp_report_while_rlp_ablate_writes_the_same_folder(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID)
    folder = tmp_path / "res" / "grid"
    writer = subprocess.Popen(RLP + ["ablate", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "res"),
                                     "--eval", "none", "--jobs", "1"],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_run_started(folder, writer)
    reports = []
    while writer.poll() is None or not reports:
        r = subprocess.run(RLP + ["report", str(folder), "--no-plots"], env=ENV, capture_output=True, text=True)
        reports.append(r)
        assert "Traceback" not in r.stderr and r.returncode in (0, 2), r.stderr
    assert writer.wait() == 0
    final = subprocess.run(RLP + ["report", str(folder)], env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
