"""torch.profiler over one fast SmolLM2 step at the reference setting (docs/performance.md).

    .venv/bin/python bench/profile_step.py [KEY=VALUE ...]
"""
import sys, time, torch
from rlp_cli.bench import bench_config
from rlp_cli.train import Trainer
from torch.profiler import profile, ProfilerActivity
extra = sys.argv[1:]
cfg = bench_config("smollm2-135m", extra, False)
tr = Trainer(cfg)
tr.train_step()
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    t=time.perf_counter(); m,_=tr.train_step(); print("step", time.perf_counter()-t, {k:round(v,3) for k,v in m.items() if k.startswith('time/')})
ka = prof.key_averages()
print(ka.table(sort_by="self_cpu_time_total", row_limit=30))
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))
