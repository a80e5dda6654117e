"""A/B the update and rollout on one fixed SmolLM2 batch (docs/performance.md): .venv/bin/python bench/update_ab.py base|flush|sparse+fused+flush"""
import sys, time, statistics, torch, os
from rlp_cli.bench import bench_config
from rlp_cli.train import Trainer
from rlp_cli import rollout as R
from rlp_cli import update as U
variant = sys.argv[1] if len(sys.argv) > 1 else "base"
cfg = bench_config("smollm2-135m", [], False)
tr = Trainer(cfg)
if "flush" in variant: torch.set_flush_denormal(True)
if "sparse" in variant:
    tr.model.get_input_embeddings().sparse = True
if "fused" in variant:
    tr.optimizer = torch.optim.AdamW(tr.master.params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, fused=True)
if "noforeach" in variant:
    tr.optimizer = torch.optim.AdamW(tr.master.params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, foreach=False)
tr.train_step()
b = tr.last_batch
ctx, ro, adv = b["contexts"], b["rollouts"], b["advantages"]
g = cfg.objective.num_rollouts
def loss_fn(rows, logp):
    return (logp * adv[rows].unsqueeze(1)).sum() / logp.shape[0] * (rows.stop - rows.start) / len(adv)
def update():
    tr.optimizer.zero_grad(set_to_none=True)
    U.policy_update(tr.model, ctx, ro, g, 1.0, tr.pad_id, loss_fn, True, banned=tr.banned)
    t = time.perf_counter()
    tr.master.take_grads(); torch.nn.utils.clip_grad_norm_(tr.master.params, 1.0); tr.optimizer.step(); tr.master.push_weights()
    return time.perf_counter() - t
def rollout():
    tr.model.eval()
    R.sample_thoughts(tr.model, ctx, num_rollouts=g, max_thought_tokens=32, temperature=1.0, close_id=tr.close_id,
                      pad_id=tr.pad_id, generator=torch.Generator().manual_seed(0), score_targets=True, token_classes=tr.token_classes)
    tr.model.train()
from rlp_cli.measure import peak_rss_mb
which = os.environ.get("WHICH", "both")
res = {}
for name, fn in (("update", update), ("rollout", rollout)):
    if which not in ("both", name): continue
    ts, opt = [], []
    for i in range(int(os.environ.get("REPS", 3))):
        t = time.perf_counter(); o = fn(); ts.append(time.perf_counter() - t); opt.append(o or 0)
    res[name] = (statistics.median(ts), min(ts), statistics.median(opt))
print(variant, {k: tuple(round(x, 3) for x in v) for k, v in res.items()}, "peak RSS", round(peak_rss_mb()), "MB")
