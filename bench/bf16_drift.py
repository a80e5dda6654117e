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

import torch

from rlp_cli.bench import bench_config, info_gain_drift
from rlp_cli.train import Trainer

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
trainer = Trainer(bench_config("smollm2-135m", [f"seed={seed}"], False))
trainer.train_step()
low = copy.deepcopy(trainer.model).to(torch.bfloat16)
print(json.dumps({"seed": seed, **info_gain_drift(low, trainer.model, trainer)}, indent=1))
