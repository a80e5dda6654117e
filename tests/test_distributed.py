"""One run over several processes: 2 gloo processes train exactly as 1 process on the same global batch.

The thoughts come from the random sampler, whose stream depends on how a batch is split, so the
equivalence test swaps in a sampler without randomness (row j of each group takes the j-th likeliest
token): then 1 and 2 processes see the same contexts, the same thoughts and the same rewards, and any
difference in the parameters is the data-parallel machinery's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RLP_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RLP_FAILPOINT"):
    ENV.pop(key, None)
G = 4

WORKER = f"""
import os, sys, torch
from rlp_cli import rollout
from rlp_cli.config import load_config
from rlp_cli.train import Trainer

def split_invariant_sample(logits, temperature, generator, banned=None):
    z = logits.float() / temperature
    if banned is not None:
        z = z.index_fill(-1, banned, float("-inf"))
    logp = torch.log_softmax(z, -1)
    row_in_group = torch.arange(z.shape[0], device=z.device) % {G}
    tok = logp.topk({G}, -1).indices.gather(-1, row_in_group[:, None]).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

rollout._sample = split_invariant_sample
objective, out, device = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config("tiny", [f"objective.name={{objective}}", "optim.batch_documents=4",
                           "objective.num_rollouts={G}", "data.positions=stride", "data.max_positions_per_document=2",
                           f"device={{device}}"])
trainer = Trainer(cfg)
metrics = [trainer.train_step()[0] for _ in range(2)]
teacher = None if trainer.teacher is None else {{k: v.clone() for k, v in trainer.teacher.state_dict().items()}}
torch.save({{"params": {{n: p.detach().clone() for n, p in trainer.model.named_parameters()}}, "teacher": teacher,
            "metrics": metrics}}, f"{{out}}.rank{{os.environ.get('RANK', '0')}}")
"""


def run_worker(tmp_path: Path, objective: str, nproc: int, device: str = "cpu") -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{objective}-{nproc}"
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    r = subprocess.run(launcher + [str(script), objective, str(out), device], env=ENV, capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(f"{out}.rank{rank}", weights_only=False, map_location="cpu") for rank in range(nproc)]


@pytest.mark.parametrize("objective", ["rlp", "ntp"])
def test_two_gloo_processes_train_as_one_process_on_the_same_global_batch(tmp_path, objective):
    [one] = run_worker(tmp_path, objective, 1)
    two = run_worker(tmp_path, objective, 2)
    start = _run_start_params(tmp_path)
    moved = 0
    for name, p in one["params"].items():
        for rank in range(2):
            assert torch.allclose(two[rank]["params"][name], p, atol=2e-6, rtol=1e-5), (name, rank)
        assert torch.equal(two[0]["params"][name], two[1]["params"][name]), name  # the ranks never drift apart
        moved += not torch.equal(p, start[name])
    assert moved > len(one["params"]) // 2  # the steps did change the weights
    if objective == "rlp":
        for key, value in two[0]["teacher"].items():
            assert torch.equal(value, two[1]["teacher"][key]), key  # the EMA teacher is the same on every rank
            assert torch.allclose(value, one["teacher"][key], atol=2e-6, rtol=1e-5), key
        for m1, m2 in zip(one["metrics"], two[0]["metrics"]):
            assert m2["num_contexts"] == m1["num_contexts"] == 8  # 4 windows x 2 positions, split 2 + 2 ways
            assert m2["reward"] == pytest.approx(m1["reward"], abs=1e-5)  # averaged over the ranks
            assert m2["input_tokens"] == m1["input_tokens"]


def _run_start_params(tmp_path: Path) -> dict:
    from rlp_cli.models import load_model

    return {n: p.detach() for n, p in load_model("tiny").model.named_parameters()}


def test_rlp_train_nproc_2_writes_one_run_folder_and_resumes_only_with_2(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlp_cli.cli", "train", "tiny", "--nproc", "2", "--out", str(run), "--no-progress",
           "--set", "optim.batch_documents=4", "--set", "budget.steps=4", "--set", "log.checkpoint_every=2",
           "--set", "log.save_final=false"]
    env = {**ENV, "RLP_FAILPOINT": "checkpoint-renamed@2"}  # rank 0 dies right after the step-2 checkpoint
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # one writer: every step once
    assert json.loads((run / "provenance.json").read_text())["world_size"] == 2

    one = subprocess.run(cmd[:5] + cmd[7:], env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and "written by 2 process(es)" in " ".join(one.stderr.split()), one.stderr
    assert "Traceback" not in one.stderr

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
