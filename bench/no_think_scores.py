"""The no-think score of each trained model on its ablation's probe positions: log p_theta(x_t | x_<t).

    .venv/bin/python bench/no_think_scores.py results/thought-vs-ntp     (about a minute per model on 2 cores)

The probe of runs trained before probe/s_nothink existed scores thoughts against the EMA teacher only;
this scores the same 32 held-out positions with each run's final/ model and no thought, against the base
model, paired position by position. It tells whether a gain against the (lagging) EMA teacher is thinking
or a better model: see docs/demo.md and the README's thought-vs-ntp reading.
"""
import glob, json, sys
import torch
from rlp_cli.config import load_config
from rlp_cli.train import Trainer
from rlp_cli.probe import Probe
from rlp_cli.stats import paired_bootstrap
torch.set_num_threads(2)
folder = sys.argv[1]
scores = {}
for run in ["base"] + sorted(glob.glob(f"{folder}/*/final")):
    cfg = load_config(sorted(glob.glob(f"{folder}/*/config.yaml"))[0], ["log.probe_every=0"] + ([f"model.name={run}"] if run != "base" else []))
    tr = Trainer(cfg)
    p = Probe(tr)
    with torch.no_grad():
        s, _ = tr.no_think_logprobs(tr.model, p.windows, p.contexts)
    scores[run] = s[:, 0].tolist()
    print(run, "items", len(p), "mean no-think log p(x_t)", round(sum(scores[run]) / len(p), 3), flush=True)
runs = list(scores)
for i, run in enumerate(runs):  # every pair, paired position by position
    for other in runs[:i]:
        t = paired_bootstrap([a - b for a, b in zip(scores[run], scores[other])], 10000)
        print(f"{run} - {other}: {t['mean']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}] p={t['p']:.4f}")
