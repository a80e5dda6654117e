"""`rlp bench --vs-trl`: the reference setting through Hugging Face TRL's GRPOTrainer.

TRL is an optional extra, never a dependency of rlp. The same prompts (x_<t + <think>), an
information-gain reward that re-encodes prompt + thought with the policy and x_<t with an EMA
teacher, and a callback that updates the teacher after each step. It runs in a child process so
that its peak memory is its own.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time

from rlp_cli.measure import peak_rss_mb, summarize
from rlp_cli.errors import UserError

TRL_MISSING = ("rlp bench --vs-trl: the comparison runs Hugging Face TRL's GRPOTrainer, and the package `trl` is not "
               "installed (it is not part of rlp's install). Fix: `pip install trl` (into a separate environment if "
               "you want to keep this one as it is), or drop --vs-trl.")


def check_trl() -> None:
    """TRL is an optional extra, never in rlp's install: say how to get it when it is missing."""
    import importlib.util

    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        raise UserError(TRL_MISSING)


def run_trl(config: dict, warmup: int, steps: int) -> dict:
    """Time GRPOTrainer steps doing RLP at the same setting (runs in a child process; see trl_in_child)."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlp_cli.config import TrainConfig
    from rlp_cli.models import forward
    from rlp_cli.cursor import positions, right_pad
    from rlp_cli.rollout import token_logp
    from rlp_cli.train import Trainer

    cfg = TrainConfig.model_validate(config)
    rlp = Trainer(cfg)  # only for its model, tokenizer, thread setting and the same windows and positions
    obj, g = cfg.objective, cfg.objective.num_rollouts
    prompts, per_step = [], None
    for _ in range(warmup + steps):
        windows = rlp.stream.next_batch(cfg.optim.batch_documents)
        contexts = rlp.contexts_for(windows, None)
        if per_step is not None and len(contexts) != per_step:
            raise UserError("rlp bench --vs-trl: GRPOTrainer needs the same number of prompts at every step, and "
                            f"data.positions={cfg.data.positions} gives {per_step}, then {len(contexts)}. "
                            "Fix: compare with data.positions=random_one (the reference setting).")
        per_step = len(contexts)
        prompts += [{"prompt": rlp.tok.decode(c.prompt), "rlp_prompt": c.prompt,
                     "rlp_prefix": windows[c.doc_index][:c.position], "rlp_target": c.targets[0]} for c in contexts]
    teacher = copy.deepcopy(rlp.model).eval().requires_grad_(False)
    grpo_holder = {}

    @torch.no_grad()
    def last_token_logp(model, rows, targets):
        ids, mask = right_pad(rows, rlp.pad_id, rlp.device)
        logits, _ = forward(model, ids, mask, positions(mask))
        last = logits[torch.arange(len(rows)), mask.sum(1) - 1]
        return token_logp(last, torch.tensor(targets, device=rlp.device))

    def info_gain(prompts, completions, completion_ids, rlp_prompt, rlp_prefix, rlp_target, **kwargs):
        # S_pred re-encodes prompt + thought + </think> with the policy; S_ema scores x_<t once per prompt.
        policy = grpo_holder["trainer"].model
        rows = [p + list(c) + ([] if c and c[-1] == rlp.close_id else [rlp.close_id])
                for p, c in zip(rlp_prompt, completion_ids)]
        s_pred = last_token_logp(policy, rows, rlp_target)
        unique = list(dict.fromkeys((tuple(p), t) for p, t in zip(rlp_prefix, rlp_target)))
        s_ema = dict(zip(unique, last_token_logp(teacher, [list(p) for p, _ in unique], [t for _, t in unique])))
        return (s_pred - torch.stack([s_ema[(tuple(p), t)] for p, t in zip(rlp_prefix, rlp_target)])).tolist()

    class EmaAndClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), grpo_holder["trainer"].model.parameters()):
                    t.lerp_(s.detach(), 1.0 - obj.ema_tau)
            if rlp.device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            last = self.ends[-1] - (self.ends[-2] if len(self.ends) > 1 else start)
            kind = "warm-up" if len(self.ends) <= warmup else "step"
            print(f"  TRL {kind} {len(self.ends)}/{warmup + steps}: {last:.3f} s", flush=True)

    clock = EmaAndClock()
    with tempfile.TemporaryDirectory(prefix="rlp-bench-trl-") as out_dir:
        args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=per_step * g, num_generations=g,
                          max_completion_length=obj.thought_tokens, temperature=obj.temperature,
                          learning_rate=cfg.optim.lr, beta=0.0, epsilon=obj.clip_eps_low,
                          epsilon_high=obj.clip_eps_high, scale_rewards="none", loss_type="grpo",
                          num_iterations=1, steps_per_generation=1, max_steps=warmup + steps,
                          shuffle_dataset=False, disable_dropout=True, report_to="none", save_strategy="no",
                          logging_steps=1, disable_tqdm=True, use_cpu=rlp.device.type == "cpu",
                          generation_kwargs={"eos_token_id": [rlp.close_id]},
                          # like for like with rlp: float32 compute, activations kept (TRL's defaults are
                          # bf16 autocast and gradient checkpointing)
                          bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=copy.deepcopy(rlp.model), reward_funcs=info_gain, args=args,
                              train_dataset=Dataset.from_list(prompts), processing_class=rlp.tok, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # its per-step log lines would bury rlp's table
        grpo_holder["trainer"] = trainer
        start = time.perf_counter()
        trainer.train()
    step_times = [b - a for a, b in zip([start] + clock.ends, clock.ends)][warmup:]
    logged = [r for r in trainer.state.log_history if "completions/mean_length" in r][warmup:]
    tokens = [r["completions/mean_length"] * per_step * g for r in logged]
    return {"trl_version": __import__("trl").__version__,
            "settings": {k: getattr(args, k) for k in ("per_device_train_batch_size", "num_generations",
                                                       "max_completion_length", "bf16", "gradient_checkpointing",
                                                       "loss_type", "scale_rewards", "beta")},
            "step_time_s": summarize(step_times),
            "thought_tokens_per_s": summarize([n / t for n, t in zip(tokens, step_times)]),
            "steps_per_s": summarize([1.0 / t for t in step_times]), "peak_rss_mb": peak_rss_mb(),
            "prompts_per_step": per_step}


def _trl_child(config: dict, warmup: int, steps: int, queue) -> None:
    try:
        queue.put(("ok", run_trl(config, warmup, steps)))
    except UserError as e:
        queue.put(("user", str(e)))
    except Exception as e:  # reported by the parent with its type; the rlp result is kept either way
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _give_memory_back() -> None:
    """Return freed heap to the OS (glibc keeps it), so the TRL child does not compete with rlp's leftovers."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def trl_in_child(cfg, warmup: int, steps: int) -> dict:
    """run_trl in a fresh process, so its peak RSS is not mixed with rlp's."""
    import multiprocessing

    _give_memory_back()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_trl_child, args=(cfg.to_dict(), warmup, steps, queue))
    child.start()
    import queue as queues

    while True:
        try:
            status, payload = queue.get(timeout=5)
            break
        except queues.Empty:
            if not child.is_alive():  # killed before it could report
                status, payload = "error", f"the child process died with exit code {child.exitcode}"
                if child.exitcode == -9:
                    payload += (" (SIGKILL: usually the kernel's out-of-memory killer; TRL's GRPOTrainer needed "
                                "over 13 GB for SmolLM2 at the reference setting)")
                break
    child.join()
    if status == "user":
        raise UserError(payload)
    if status == "error":
        raise UserError(f"rlp bench --vs-trl: TRL's GRPOTrainer failed: {payload}. The rlp numbers above were "
                        "written. Fix: free memory (or use a smaller model), and check that the installed trl works "
                        "with this transformers version.")
    return payload
