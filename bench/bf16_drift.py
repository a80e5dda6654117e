"""The reward a bfloat16 policy gives, against float32, on the same SmolLM2 thoughts (docs/performance.md).

`rlp bench --set model.dtype=bfloat16` reports the same drift after its timed steps, but on a CPU
without bfloat16 instructions a bfloat16 step takes minutes. Here the thoughts come from one float32
step at the reference setting, and only their scoring is done twice: S_pred by the float32 policy and
by its bfloat16 copy (the EMA teacher is float32 in both runs, so the info gain differs by S_pred only).

    .venv/bin/python bench/bf16_drift.py [seed]
"""

import copy
import json
import sys
import time

import torch

from rlp_cli.bench import _rank_agreement, bench_config
from rlp_cli.rollout import naive_s_pred
from rlp_cli.train import Trainer

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
trainer = Trainer(bench_config("smollm2-135m", [f"seed={seed}"], False))
trainer.train_step()
batch, g = trainer.last_batch, trainer.cfg.objective.num_rollouts
policy = trainer.model.eval()
low = copy.deepcopy(policy).to(torch.bfloat16)
scores = {}
for name, model in (("float32", policy), ("bfloat16", low)):
    start = time.perf_counter()
    s_pred, _ = naive_s_pred(model, batch["contexts"], batch["rollouts"], g, trainer.close_id, trainer.pad_id)
    scores[name] = s_pred[:, 0].float()
    print(f"{name}: S_pred of {len(s_pred)} thoughts in {time.perf_counter() - start:.1f} s", flush=True)
drift = scores["bfloat16"] - scores["float32"]
reward_std = batch["rewards"].float().view(-1, g).std(dim=-1).mean()
print(json.dumps({
    "seed": seed, "thoughts": len(drift), "info_gain_difference_mean": float(drift.mean()),
    "info_gain_difference_mean_abs": float(drift.abs().mean()), "info_gain_difference_max_abs": float(drift.abs().max()),
    "reward_std_within_groups": float(reward_std),
    "advantage_rank_agreement": _rank_agreement(scores["float32"].view(-1, g), scores["bfloat16"].view(-1, g)),
}, indent=1))
