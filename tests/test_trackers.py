"""log.report_to: a `tiny` run reports to TensorBoard, MLflow, W&B (offline) and Trackio, read back from what they
wrote; a resume continues the same tracker runs; a failing tracker never stops the run; bad names exit 2.

Nothing here reaches a server: W&B has no credentials (so rlp picks offline), MLflow writes a file store, Trackio
its local store in tmp_path. A tracker whose library is not installed has its test skipped.
"""

import importlib.util
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlp_cli.config import load_config
from rlp_cli.errors import UserError
from rlp_cli.run import train
from rlp_cli.runio import read_json, read_jsonl
from rlp_cli.trackers import Trackers, mlflow_key, open_trackers

AVAILABLE = [name for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb"),
                                       ("trackio", "trackio")) if importlib.util.find_spec(module) is not None]
FAST = ["log.probe_every=2", "log.probe_contexts=4", "log.save_final=false", "log.samples_every=100"]


def offline_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "RLP_TRACKER_GROUP"):
        mp.delenv(var, raising=False)
    mp.setenv("NETRC", str(root / "no-netrc"))  # no `wandb login` key: rlp must choose offline itself
    for var, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data"), ("TRACKIO_DIR", "trackio")):
        mp.setenv(var, str(root / sub))


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """One run of an ablation `grid` (RLP_TRACKER_GROUP, as `rlp ablate` sets it) reporting to every tracker here."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, root)
        mp.setenv("RLP_TRACKER_GROUP", "grid")
        cfg = load_config("tiny", FAST + [f"log.report_to={','.join(AVAILABLE)}"])
        out = root / "grid" / "tiny-run"
        assert train(cfg, out, progress=False)["status"] == "completed"
    return out, read_jsonl(out / "metrics.jsonl")


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_has_every_metric_at_its_step(grid_run):
    pytest.importorskip("tensorboard")
    out, rows = grid_run
    scalars = tensorboard_scalars(out / "tensorboard")
    trained = [r for r in rows if "loss" in r]
    for key in ("loss", "reward", "rewards/info_gain/mean", "rlp/info_gain", "grad_norm"):
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in trained], key
    assert [s for s, _ in scalars["probe/info_gain"]] == [0, 2, 4]  # the step-0 probe row too
    assert "step" not in scalars


def test_mlflow_file_store_has_metrics_params_and_the_group(grid_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, rows = grid_run
    ids = read_json(out / "trackers.json")["mlflow"]
    assert ids["tracking_uri"] == (out.parent / "mlruns").resolve().as_uri()  # beside the run: one per ablation
    client = MlflowClient(ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "grid"
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny" and run.data.tags["rlp.group"] == "grid"
    assert run.data.params["objective.name"] == "rlp" and run.data.params["budget.steps"] == "4"
    assert "log.report_to" not in run.data.params
    for key in ("loss", "reward", "rewards/info_gain/mean", "clip_ratio/low_mean"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["step"], pytest.approx(r[key])) for r in rows if key in r], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "probe/info_gain")] == [0, 2, 4]


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: a LevelDB-style log (32 KiB blocks of crc32, length, type, data) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_writes_an_offline_run_without_a_login(grid_run):
    pytest.importorskip("wandb")
    out, rows = grid_run
    run_id = read_json(out / "trackers.json")["wandb"]
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    records = wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.run_group, run.project) == ("tiny", "grid", "rlp")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            item = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            history[int(item["_step"])] = item
    assert sorted(history) == [0, 1, 2, 3, 4]
    for row in rows[1:]:
        assert float(history[row["step"]]["loss"]) == pytest.approx(row["loss"], rel=1e-6, abs=1e-9)
    assert next(r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit") == 0


def test_trackio_local_project_is_the_ablation(grid_run):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    _, rows = grid_run
    logs = SQLiteStorage.get_logs("grid", "tiny")
    assert [log["step"] for log in logs] == [0, 1, 2, 3, 4]
    assert [log.get("reward") for log in logs[1:]] == [pytest.approx(r["reward"]) for r in rows[1:]]
    assert SQLiteStorage.get_run_config("grid", "tiny")["_Group"] == "grid"


def test_a_resume_continues_the_tracker_runs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from rlp_cli.train import Trainer

    offline_env(monkeypatch, tmp_path)
    cfg = load_config("tiny", FAST + ["log.report_to=[tensorboard,mlflow]"])
    out = tmp_path / "run"
    step = Trainer.train_step

    def stop_before_step_4(self):
        if self.step == 3:
            raise KeyboardInterrupt  # after step 3 was logged; the checkpoint holds step 2
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", stop_before_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    first = read_json(out / "trackers.json")["mlflow"]
    client = MlflowClient(first["tracking_uri"])
    assert client.get_run(first["run_id"]).info.status == "KILLED"
    monkeypatch.setattr(Trainer, "train_step", step)
    assert train(cfg, out, progress=False)["status"] == "completed"  # resumes from step 2
    assert read_json(out / "trackers.json")["mlflow"] == first
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
    rows = read_jsonl(out / "metrics.jsonl")
    loss = tensorboard_scalars(out / "tensorboard")["loss"]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6, abs=1e-9)) for r in rows if "loss" in r]


def test_report_to_does_not_change_a_run_id_or_refuse_a_resume(tmp_path):
    from rlp_cli.ablate import run_id
    from rlp_cli.run import _check_run_dir
    from rlp_cli.runfolder import RunFolder
    from rlp_cli.runio import write_yaml

    plain, tracked = load_config("tiny"), load_config("tiny", ["log.report_to=wandb"])
    assert run_id(plain) == run_id(tracked)
    write_yaml(tmp_path / "config.yaml", plain.to_dict())
    _check_run_dir(RunFolder(tmp_path), tracked)  # no UserError


@pytest.mark.parametrize("value,expect", [("wandb", ["wandb"]), ("tensorboard,mlflow", ["tensorboard", "mlflow"]),
                                          ("[trackio, wandb, trackio]", ["trackio", "wandb"]), ("none", []),
                                          ("[]", [])])
def test_report_to_takes_a_name_a_list_or_none(value, expect):
    assert load_config("tiny", [f"log.report_to={value}"]).log.report_to == expect


def test_an_unknown_tracker_exits_2_with_one_paragraph(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "rlp_cli.cli", "train", "tiny", "--out", str(tmp_path / "o"),
                        "--no-progress", "--set", "log.report_to=[tensorbord]"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    message = " ".join(r.stderr.split())
    assert "log.report_to" in message and "did you mean 'tensorboard'" in message and "Fix" in message
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_a_missing_library_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'rlp-cli\[wandb\]'"):
        open_trackers(load_config("tiny", ["log.report_to=wandb"]), tmp_path)


def test_a_failing_tracker_warns_once_and_the_others_go_on(capsys):
    class Broken:
        def log(self, step, metrics):
            raise ConnectionError("server gone")

        def close(self, status):
            raise AssertionError("a dropped tracker is not closed")

    class Kept:
        rows, status = [], None

        def log(self, step, metrics):
            self.rows.append((step, metrics))

        def close(self, status):
            self.status = status

    kept = Kept()
    trackers = Trackers({"wandb": Broken(), "mlflow": kept})
    for step in (1, 2):
        trackers.log(step, {"step": step, "loss": 0.5, "kl": None, "rlp/info_gain": float("nan"), "note": "x"})
    trackers.close("completed")
    assert kept.rows == [(1, {"loss": 0.5}), (2, {"loss": 0.5})] and kept.status == "completed"
    assert capsys.readouterr().err.count("wandb failed at step 1 (ConnectionError: server gone)") == 1


def test_mlflow_key_keeps_the_metric_names():
    assert mlflow_key("rewards/info_gain/mean") == "rewards/info_gain/mean"
    assert mlflow_key("a//b") == "a__b" and mlflow_key("x@y") == "x_y"


def test_ablate_children_get_the_ablation_as_group(tmp_path):
    from rlp_cli.ablate.scheduler import Job, LocalBackend, Slot

    job = Job(name="r", folder=tmp_path / "my-grid" / "r-1234", phases=[])
    job.folder.mkdir(parents=True)
    backend = LocalBackend([Slot("cpu", {"RLP_NUM_THREADS": "1"})])
    backend.submit(job, "train", [sys.executable, "-c", "import os; print(os.environ['RLP_TRACKER_GROUP'])"])
    while not backend.poll():
        time.sleep(0.05)
    assert (job.folder / "train.log").read_text().splitlines()[-1] == "my-grid"
