"""`rlp ablate --backend ray|slurm`: the same grid on a local Ray and on submitit's local executor (the
Slurm backend without a cluster), a run held by a live lease elsewhere is never started twice, and a
grid over several GPUs per run asks for them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlp_cli import runio
from rlp_cli.ablate.scheduler import Job, LocalBackend, Scheduler, make_slots
from rlp_cli.errors import UserError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RLP_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
ENV.pop("RLP_FAILPOINT", None)
GRID = "base: tiny\nseeds: [0, 1]\nset: {budget.steps: %d, log.checkpoint_every: 2}\n"


def ablate(tmp_path: Path, *args: str, steps: int = 4, **kwargs) -> subprocess.CompletedProcess:
    (tmp_path / "grid.yaml").write_text(GRID % steps)
    cmd = [sys.executable, "-m", "rlp_cli.cli", "ablate", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "res"),
           "--eval", "none", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def runs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "res" / "grid").iterdir() if p.is_dir() and not p.name.startswith("."))


def steps_of(run: Path) -> list[int]:
    return [row["step"] for row in runio.read_jsonl(run / "metrics.jsonl")]


@pytest.mark.parametrize("backend", [["--backend", "ray"], ["--backend", "slurm", "--slurm-executor", "local"]],
                         ids=["ray", "slurm"])
def test_a_grid_on_another_backend_finishes_and_a_rerun_skips_it(tmp_path, backend):
    pytest.importorskip("ray" if "ray" in backend else "submitit")
    r = ablate(tmp_path, *backend)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("local Ray on 127.0.0.1" in r.stdout) if "ray" in backend else ("submitit's local executor" in r.stdout)
    for run in runs(tmp_path):
        assert runio.read_json(run / "status.json")["status"] == "completed" and steps_of(run) == list(range(5))
        assert "=== rlp ablate on" in (run / "train.log").read_text()  # the task ran the same command
        assert not (run / "lease.json").exists()
    again = ablate(tmp_path, *backend)
    assert again.returncode == 0 and "2 already done, 0 to run" in again.stdout, again.stdout


def test_ctrl_c_stops_a_ray_grid_resumably(tmp_path):
    """Ctrl-C with one run finished and one training: the first stays completed, the second is interrupted."""
    pytest.importorskip("ray")
    # 20,000 tiny steps take minutes: the long run cannot finish before the interrupt, however late its worker starts
    (tmp_path / "grid.yaml").write_text("base: tiny\nseeds: [0]\nset: {log.checkpoint_every: 2}\n"
                                        "grid: {budget.steps: [3, 20000]}\n")
    cmd = [sys.executable, "-m", "rlp_cli.cli", "ablate", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "res"),
           "--eval", "none", "--backend", "ray"]
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not (status_of(tmp_path, 3) == "completed" and len(steps_of(run_with(tmp_path, 20000))) >= 3):
            assert driver.poll() is None, driver.communicate()[0]
            assert time.time() < deadline, "the short run did not finish and the long one start within 180 s"
            time.sleep(0.1)
    except BaseException:
        driver.kill()
        driver.communicate()
        raise
    driver.send_signal(signal.SIGINT)
    out = driver.communicate(timeout=120)[0]
    assert driver.returncode == 130 and "Traceback" not in out and "Check failed" not in out, out
    assert status_of(tmp_path, 3) == "completed" and status_of(tmp_path, 20000) == "interrupted"
    for run in runs(tmp_path):
        assert not (run / "lease.json").exists()


def run_with(tmp_path: Path, steps: int) -> Path:
    """The grid's run of budget.steps=`steps` (its folder is named steps-<steps>_s0-<id>)."""
    grid = tmp_path / "res" / "grid"
    return next(grid.glob(f"steps-{steps}_s0-*"), grid / "not-yet")


def status_of(tmp_path: Path, steps: int) -> str | None:
    path = run_with(tmp_path, steps) / "status.json"
    return runio.read_json(path).get("status") if path.exists() else None


def test_a_run_held_by_a_live_lease_elsewhere_is_not_started_twice(tmp_path):
    assert ablate(tmp_path).returncode == 0
    held = next(p for p in runs(tmp_path) if p.name.startswith("run_s1"))
    for name in ("metrics.jsonl", "status.json"):  # as if another node had just started it
        (held / name).unlink()
    lease = {"host": "node-7.cluster", "pid": 4242, "updated": time.time(), "ttl_s": 120.0}
    runio.write_json(held / "lease.json", lease)
    runio.write_json(held / "status.json", {"status": "running", "pid": 4242})
    r = ablate(tmp_path)
    assert r.returncode == 1 and "1 busy elsewhere" in r.stdout and "another process is training it" in r.stderr
    assert not (held / "metrics.jsonl").exists()  # not started here
    runio.write_json(held / "lease.json", {**lease, "updated": time.time() - 1000})  # its holder died long ago
    r = ablate(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert steps_of(held) == list(range(5))


def test_several_gpus_per_run_make_slots_of_several_gpus_and_runs_over_torchrun(tmp_path):
    slots = make_slots("0,1,2,3,4", None, 8, gpus_per_slot=2)
    assert [s.label for s in slots] == ["cuda:0,1", "cuda:2,3"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
    scheduler = Scheduler([], LocalBackend(slots), None, False, nproc=2)
    argv = scheduler.argv(Job(name="r", folder=tmp_path, phases=["train"]), "train")
    assert argv[-2:] == ["--nproc", "2"]
    with pytest.raises(UserError, match="only 1 GPU"):
        make_slots("0", None, 1, gpus_per_slot=2)
    with pytest.raises(UserError, match="no GPU is visible"):
        make_slots("cpu", None, 1, gpus_per_slot=2)


def test_rlp_train_refuses_a_folder_leased_elsewhere_and_a_lease_is_released_only_by_its_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    runio.write_json(run / "lease.json", {"host": "node-7.cluster", "pid": 4242, "updated": time.time()})
    r = subprocess.run([sys.executable, "-m", "rlp_cli.cli", "train", "tiny", "--out", str(run)], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "being trained right now by process 4242 on node-7.cluster" in " ".join(
        r.stderr.split()), r.stderr
    assert not (run / "metrics.jsonl").exists()

    lease = runio.Lease(tmp_path / "mine.json").__enter__()
    other = {"host": "node-7.cluster", "pid": 4242, "updated": time.time()}
    runio.write_json(tmp_path / "mine.json", other)  # taken over (ours looked stale to someone)
    lease.__exit__(None, None, None)
    assert runio.read_json(tmp_path / "mine.json") == other  # not ours to delete
