"""`rlp eval`: task accuracy and intrinsic metrics of a trained run (or any model), as eval.json.

What is measured
- Task suites built from reasoning-gym generators at fixed seeds, in two groups like the paper's
  averages: `math` (arithmetic and word problems) and `logic` (syllogisms, kinship, string tasks: no
  arithmetic). The model thinks with the trainer's template,

      thought_prompt + "Question: <q>\\n" + <think> thought </think> + "Answer:" answer \\n

  one greedy thought (-> `acc`) and k sampled thoughts (-> `pass@1`, the mean over the k), each
  followed by a greedy answer that ends at the first newline. The suites, their seeds, scoring and
  aggregation are rlp_cli/suites.py.
- Intrinsic metrics on the held-out split of the run's training corpus: no-think perplexity, and the
  mean information gain log p(x_t | x_<t, thought) - log p(x_t | x_<t) of sampled thoughts. No EMA
  teacher exists after training, so the no-think baseline is the evaluated model itself.
- `--suite lm-eval:TASK1,TASK2`: hands the loaded model to lm-evaluation-harness (lm_eval_bridge.py).

The output follows lm-evaluation-harness's results layout (results, groups, configs, versions,
n-samples) plus provenance; per-sample outputs go to eval_samples.jsonl beside eval.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rlp_cli import runio
from rlp_cli.errors import UserError
from rlp_cli.lm_eval_bridge import lm_eval_task_manager, lm_eval_version, require_lm_eval, run_lm_eval
from rlp_cli.runfolder import RunFolder, samples_beside
from rlp_cli.suites import (ANSWER_PREFIX, QUESTION_TEMPLATE, SUITE_VERSION, SUITES, Problem, SuiteSettings, aggregate,
                            build_suite, parse_settings, score, select_tasks)

if TYPE_CHECKING:
    from rlp_cli.train import PhaseTimer

BASELINE_NOTE = ("no EMA teacher exists after training: the no-think baseline of the information gain is the "
                 "evaluated model itself, scoring the same token without a thought")


# --------------------------------------------------------------------------------------------
# Generation: the trainer's decoding engine (rollout.decode) over batches of problems from the whole suite


PREFILL_PADDING = 0.1  # prompts (sorted by length) are prefilled in groups with up to this share of padding


class AnswerEnd:
    """The stop rule of an answer: its first newline after some text (leading blank lines do not end it),
    or </think> or EOS. Per-token tables (models.LineTokens), so no step decodes text."""

    def __init__(self, lines, stop_ids: list[int], n: int, device):
        import torch

        self.lines, self.stop_ids = lines, torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.has_text = torch.zeros(n, dtype=torch.bool, device=device)

    def __call__(self, tok, alive):
        import torch

        ends = self.lines.newline[tok] & (self.has_text | self.lines.text_first[tok])
        self.has_text |= ~self.lines.blank[tok]
        return ends | torch.isin(tok, self.stop_ids)


def generate(model, tok, prompts: list[list[int]], *, samples: int, think: bool, thought_tokens: int,
             answer_prefix: list[int], answer_tokens: int, temperature: float, close_id: int, generator,
             lines=None, banned=None, drop_finished: bool = True, clock: PhaseTimer | None = None) -> list[dict]:
    """For each prompt, 1 + samples rows: row 0 thinks greedily, the others sample; all answer greedily.

    prompts end with <think> when think is set. One engine with the trainer (rollout.decode, same sampler
    and cache): the prompts are forwarded once and their cache repeated per row; thoughts are decoded, then
    the pending token, </think> and the answer prefix fed as one block, then the answers decoded until
    each row's first newline (AnswerEnd), rows that finished leaving the batch (drop_finished). lines:
    models.line_tokens(tok), built here when not given. banned: ids no thought may contain, greedy or
    sampled (run_suite passes models.banned_ids, the trainer's policy; None: no restriction). Returns
    one dict per row: thought ids, answer ids, closed, greedy.
    """
    import torch

    from rlp_cli.models import line_tokens
    from rlp_cli.cursor import Cursor, left_pad
    from rlp_cli.rollout import decode

    phase = clock or (lambda _: contextlib.nullcontext())
    device = next(model.parameters()).device
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    rows_per_prompt = 1 + samples
    n = len(prompts) * rows_per_prompt
    greedy_row = torch.arange(n, device=device) % rows_per_prompt == 0
    with torch.no_grad():
        with phase("prefill"):
            ids, mask = left_pad(prompts, pad_id, device)
            cur = Cursor(model, ids, mask, logits_to_keep=1, prefill_padding=PREFILL_PADDING)
            # room for the thought, its pending token, </think>, the answer prefix and the answer
            cur.repeat(rows_per_prompt, reserve=(thought_tokens + 2 if think else 0) + len(answer_prefix) + answer_tokens)
            logits = cur.logits[:, -1]
        lines = (lines or line_tokens(tok, logits.shape[-1])).to(device)
        banned = None if banned is None else banned.to(device)
        block, block_mask = [], []
        thought = None
        if think:
            with phase("thought"):
                thought = decode(cur, logits, max_tokens=thought_tokens, temperature=temperature,
                                 generator=generator, pad_id=pad_id, stop=lambda t, alive: t == close_id,
                                 greedy=greedy_row, banned=banned)
            # Like the trainer: a sampled </think> is never fed, one </think> is fed after every thought;
            # a thought cut at the limit first feeds its last sampled token.
            cut = ~thought.stopped
            block = [torch.where(cut, thought.tokens[:, -1], pad_id), torch.full((n,), close_id, device=device)]
            block_mask = [cut, torch.ones_like(cut)]
        for t in answer_prefix:
            block.append(torch.full((n,), t, dtype=torch.long, device=device))
            block_mask.append(torch.ones(n, dtype=torch.bool, device=device))
        if block:
            with phase("block"):
                logits = cur.feed(torch.stack(block, 1), torch.stack(block_mask, 1).long(), logits_to_keep=1)[:, -1]
        with phase("answer"):
            stop = AnswerEnd(lines, [close_id] + ([eos_id] if eos_id is not None else []), n, device)
            answer = decode(cur, logits, max_tokens=answer_tokens, temperature=temperature, generator=generator,
                            pad_id=pad_id, stop=stop, greedy=True, drop_finished=drop_finished)
        if clock is not None:
            clock.count("forward_tokens", cur.tokens)
            clock.count("generated_tokens", answer.mask.sum() + (thought.mask.sum() if think else 0))

    def kept(dec, i):
        return [t for t, m in zip(dec.tokens[i].tolist(), dec.mask[i].tolist()) if m]

    return [{"thought_ids": kept(thought, i) if think else [],
             "answer_ids": [t for t in kept(answer, i) if t != eos_id],
             "closed": bool(thought.stopped[i]) if think else False, "greedy": bool(greedy_row[i])}
            for i in range(n)]


def suite_prompts(tok, problems: list[Problem], prompt_ids: list[int], open_id: int | None) -> list[list[int]]:
    """thought_prompt + "Question: <q>\n" (+ <think> when the model thinks), token ids per problem."""
    return [prompt_ids + tok(QUESTION_TEMPLATE.format(question=p.question.strip()), add_special_tokens=False).input_ids
            + ([open_id] if open_id is not None else []) for p in problems]


def run_suite(model, tok, problems: list[Problem], datasets: dict, settings: SuiteSettings, *, prompt_ids: list[int],
              open_id: int, close_id: int, generator, log=None, clock: PhaseTimer | None = None) -> list[dict]:
    """Generate and score every problem; one record per (problem, row), in suite order.

    Batches of settings.batch_size problems are drawn from the whole suite, not task by task, in order
    of prompt length: fewer and fuller batches (a decoding step costs about the same for 24 rows as for
    96 on a CPU), and prompts of similar length share a batch, so little left padding is cached.
    """
    from rlp_cli.models import banned_ids, line_tokens

    phase = clock or (lambda _: contextlib.nullcontext())
    answer_prefix = tok(ANSWER_PREFIX, add_special_tokens=False).input_ids
    samples = settings.samples if settings.think else 0  # without a thought every row would be the same greedy answer
    prompts = suite_prompts(tok, problems, prompt_ids, open_id if settings.think else None)
    order = sorted(range(len(problems)), key=lambda i: (len(prompts[i]), i))
    vocab = model.get_output_embeddings().weight.shape[0]
    lines = line_tokens(tok, vocab)
    banned = banned_ids(tok, open_id, close_id, vocab)  # the thoughts the trainer's policy can write
    rows_of: dict[int, list[dict]] = {}
    start = time.perf_counter()
    for b in range(0, len(order), settings.batch_size):
        batch = order[b:b + settings.batch_size]
        rows = generate(model, tok, [prompts[i] for i in batch], samples=samples, think=settings.think,
                        thought_tokens=settings.thought_tokens, answer_prefix=answer_prefix,
                        answer_tokens=settings.answer_tokens, temperature=settings.temperature,
                        close_id=close_id, generator=generator, lines=lines, banned=banned, clock=clock)
        for j, row in enumerate(rows):
            rows_of.setdefault(batch[j // (1 + samples)], []).append(row)
    seconds = time.perf_counter() - start
    records = []
    with phase("scoring"):
        for i, p in enumerate(problems):
            for k, row in enumerate(rows_of[i]):
                generated = tok.decode(row["answer_ids"])
                extracted, value, correct = score(datasets[p.task], p.entry, generated)
                records.append({"task": p.task, "group": p.group, "doc_id": p.index, "dataset_seed": p.seed,
                                "sample": "greedy" if row["greedy"] else k - 1, "question": p.question,
                                "target": p.answer, "thought": tok.decode(row["thought_ids"]),
                                "thought_tokens": len(row["thought_ids"]), "thought_closed": row["closed"],
                                "generated": generated, "answer": extracted, "score": value, "correct": correct})
    if log:
        for task in dict.fromkeys(p.task for p in problems):
            done = [r for r in records if r["task"] == task and r["sample"] == "greedy"]
            log(f"  {task:<22} acc {sum(r['correct'] for r in done) / len(done):6.1%}  ({len(done)} problems)")
        log(f"  generated {len(problems)} problems in {seconds:.1f} s ({len(problems) / seconds:.2f} problems/s, "
            f"batches of {settings.batch_size} across tasks)")
    return records


# --------------------------------------------------------------------------------------------
# Intrinsic metrics on the held-out split of the training corpus


def intrinsic_metrics(model, tok, cfg, settings: SuiteSettings, *, prompt_ids: list[int], open_id: int,
                      close_id: int, generator, seed: int) -> dict:
    import numpy as np
    import torch

    from rlp_cli.data import load_documents, split_documents, token_windows
    from rlp_cli.models import token_classes
    from rlp_cli.rollout import sample_thoughts, thought_context

    d = cfg.data
    docs = load_documents(d.corpus, d.num_documents, cfg.seed, d.text_field, d.txt_split)
    _, heldout = split_documents(docs, d.heldout_fraction)
    windows = token_windows(heldout, tok, d.max_context_tokens, d.min_prefix_tokens + 1)[:settings.heldout_windows]
    info = {"corpus": d.corpus, "heldout_fraction": d.heldout_fraction, "heldout_documents": len(heldout),
            "heldout_windows": len(windows)}
    if not windows:
        return {"heldout_perplexity": None, "heldout_info_gain": None, **info,
                "note": "the held-out split has no window long enough"}
    pad_id = tok.pad_token_id
    no_think = _heldout_logprobs(model, windows, pad_id)
    nll, count = -sum(float(lp[1:].sum()) for lp in no_think), sum(len(lp) - 1 for lp in no_think)

    # One position per window (as RLP v2 trains), drawn with a fixed rng.
    rng = np.random.default_rng([seed, 11])
    contexts = []
    for i, w in enumerate(windows[:settings.info_gain_contexts]):
        t = int(rng.integers(d.min_prefix_tokens, len(w)))
        contexts.append(thought_context(w, t, prompt_ids=prompt_ids, open_id=open_id,  # the run's thought format
                                        restate=cfg.objective.restate_tokens, horizon=1, continuation=1, doc_index=i))
    g = settings.info_gain_rollouts
    gains, s_preds = [], []
    classes = token_classes(tok, open_id, close_id, model.get_output_embeddings().weight.shape[0])
    # the no-think side sees the same instruction as the thinking side (as in training and the probe)
    prompted = _heldout_logprobs(model, [prompt_ids + w for w in windows[:len(contexts)]], pad_id) \
        if prompt_ids else no_think
    for b in range(0, len(contexts), 16):  # 64 rows at a time: a decoding step costs less per row than at 32
        chunk = contexts[b:b + 16]
        rollouts = sample_thoughts(model, chunk, num_rollouts=g, max_thought_tokens=settings.thought_tokens,
                                   temperature=cfg.objective.temperature, close_id=close_id, pad_id=pad_id,
                                   generator=generator, score_targets=True, token_classes=classes)
        s_ema = torch.tensor([float(prompted[c.doc_index][len(prompt_ids) + c.position])
                              for c in chunk]).repeat_interleave(g)
        s_pred = rollouts.s_pred[:, 0].float().cpu()
        gains += (s_pred - s_ema).tolist()
        s_preds += s_pred.tolist()
    return {"heldout_perplexity": math.exp(nll / count), "heldout_nll": nll / count, "heldout_tokens": count,
            "heldout_info_gain": sum(gains) / len(gains),
            "heldout_info_gain_frac_positive": sum(x > 0 for x in gains) / len(gains),
            "heldout_s_pred": sum(s_preds) / len(s_preds), "info_gain_contexts": len(contexts),
            "info_gain_rollouts": g, "thought_tokens": settings.thought_tokens,
            "temperature": cfg.objective.temperature, "info_gain_baseline": BASELINE_NOTE, **info}


def _heldout_logprobs(model, windows: list[list[int]], pad_id: int) -> list:
    """scoring.window_logprobs of the windows, 16 at a time (it drops the padding where that pays)."""
    from rlp_cli.scoring import window_logprobs

    return [lp for b in range(0, len(windows), 16) for lp in window_logprobs(model, windows[b:b + 16], pad_id)[0]]


# --------------------------------------------------------------------------------------------
# Targets, provenance, the entry point


def checkpoint_hash(model_dir: str | Path) -> str | None:
    """sha256 over the weight files of a model folder (names and bytes), so eval.json names the exact weights."""
    directory = Path(model_dir)
    files = sorted(p for p in directory.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_target(target: str | Path, config_overrides: list[str], config=None):
    """(model spec to load, TrainConfig for the template and held-out split, run folder or None)."""
    from rlp_cli.config import TrainConfig, load_config

    path = Path(target)
    run = RunFolder(path)
    if path.is_dir() and run.config.is_file():
        cfg = load_config(run.config, config_overrides)
        final = run.final
        if not (final / "config.json").is_file():  # a Hugging Face model folder's config, not the run's
            status = run.read_status()
            raise UserError(f"{path}: the run has no final model (final/config.json; status: "
                            f"{status.get('status', 'unknown')}). Fix: let `rlp train` finish this run (re-running "
                            "it resumes), then evaluate again.")
        return str(final), cfg, path
    if config is None:
        cfg = load_config({"model": {"name": str(target)}}, config_overrides)
    elif isinstance(config, TrainConfig):
        cfg = load_config(config.to_dict(), config_overrides)
    else:
        cfg = load_config(config, config_overrides)
    return str(target), cfg, None


def default_out(target: str | Path, run_dir: Path | None, suite: str) -> Path:
    if run_dir is not None:
        return RunFolder(run_dir).eval_json
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(target)).strip("_") or "model"
    return RunFolder(Path("evals") / f"{safe}-{re.sub(r'[^A-Za-z0-9._-]+', '_', suite)}").eval_json


def evaluate(target: str | Path, suite: str = "quick", out: Path | None = None, device: str = "auto", seed: int = 0,
             overrides: list[str] | None = None, *, config=None, reuse: bool = True, verbose: bool = False) -> dict:
    """Evaluate a run folder or a model spec; write eval.json (+ eval_samples.jsonl); return the eval dict.

    config: for a model spec (not a run folder), the run config (TrainConfig, dict or YAML path) whose
    thought_prompt and held-out split to use; default: the default config with model.name = target.
    reuse: return an existing eval.json at `out` when it was made with the same suite, settings, seed
    and weights (an ablation re-run does not evaluate twice).
    """
    from rlp_cli.models import configure_cpu, load_model, resolve_device

    started = time.time()
    log = _logger(verbose)
    lm_eval_tasks = None
    if suite.startswith("lm-eval:"):
        lm_eval_tasks = [t.strip() for t in suite.split(":", 1)[1].split(",") if t.strip()]
        if not lm_eval_tasks:
            raise UserError("--suite lm-eval: names no task. Fix: e.g. --suite lm-eval:gsm8k,arc_easy.")
    elif suite not in SUITES:
        raise UserError(f"--suite {suite}: unknown suite. Fix: use one of {', '.join(SUITES)}, or lm-eval:TASKS "
                        "when lm-evaluation-harness is installed.")
    settings, config_overrides = parse_settings(suite, overrides)
    if lm_eval_tasks:
        require_lm_eval()  # before loading anything
    model_spec, cfg, run_dir = resolve_target(target, config_overrides, config)
    out = Path(out) if out is not None else default_out(target, run_dir, suite)
    tasks = None if lm_eval_tasks else select_tasks(SUITES[suite][0], settings.tasks)

    fingerprint = {"suite": suite, "suite_version": SUITE_VERSION, "seed": seed, "settings": dataclasses.asdict(settings),
                   "thought_prompt": cfg.objective.thought_prompt,
                   "heldout": {k: getattr(cfg.data, k) for k in ("corpus", "num_documents", "heldout_fraction",
                                                                 "max_context_tokens", "min_prefix_tokens")},
                   "data_seed": cfg.seed, "temperature_info_gain": cfg.objective.temperature}
    if lm_eval_tasks:
        from rlp_cli import lm_eval_tasks as local_tasks

        fingerprint["lm_eval"] = {"version": lm_eval_version(), "local_tasks_version": local_tasks.VERSION}
    configure_cpu(cfg.threads)
    dev = resolve_device(device)
    from rlp_cli.models import resolve_model_dir

    weights_hash = checkpoint_hash(resolve_model_dir(model_spec))
    previous = runio.read_json(out, None) if reuse else None
    if isinstance(previous, dict) and previous.get("fingerprint") == fingerprint and \
            previous.get("model", {}).get("checkpoint_sha256") == weights_hash and weights_hash is not None:
        log(f"{out}: already evaluated with the same suite, settings, seed and weights; reusing it")
        return previous

    import torch

    task_manager = lm_eval_task_manager(lm_eval_tasks, settings) if lm_eval_tasks else None  # unknown tasks: fail early
    loaded = load_model(model_spec, cfg.model.dtype, dev)
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompt_ids = tok(cfg.objective.thought_prompt, add_special_tokens=False).input_ids if cfg.objective.thought_prompt else []
    generator = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    log(f"rlp eval {target} (suite {suite}, seed {seed}, device {dev})")

    if lm_eval_tasks:
        results, groups, configs, versions, n_samples, records = run_lm_eval(
            model, tok, lm_eval_tasks, seed, settings, task_manager)
    else:
        problems, datasets = build_suite(suite, seed, settings)
        records = run_suite(model, tok, problems, datasets, settings, prompt_ids=prompt_ids, open_id=loaded.think_open_id,
                            close_id=loaded.think_close_id, generator=generator, log=log)
        results, groups = aggregate(records, {t.name: t.group for t in tasks})
        configs = {t.name: {"generator": f"reasoning_gym:{t.name}", "generator_config": t.generator_config,
                            "dataset_seed": datasets[t.name].seed, "size": settings.n_per_task,
                            "question_template": QUESTION_TEMPLATE, "answer_prefix": ANSWER_PREFIX,
                            "think": settings.think, "thought_tokens": settings.thought_tokens,
                            "answer_tokens": settings.answer_tokens, "num_samples": settings.samples,
                            "temperature": settings.temperature, "answer_decoding": "greedy, ends at a newline",
                            "scorer": "the generator's score_answer; correct = score 1"} for t in tasks}
        versions = {t.name: SUITE_VERSION for t in tasks}
        n_samples = {t.name: {"original": settings.n_per_task, "effective": settings.n_per_task} for t in tasks}

    intrinsic = {}
    if settings.heldout_windows > 0:
        log("  held-out perplexity and information gain ...")
        intrinsic = intrinsic_metrics(model, tok, cfg, settings, prompt_ids=prompt_ids, open_id=loaded.think_open_id,
                                      close_id=loaded.think_close_id, generator=generator, seed=seed)

    wall = time.time() - started
    result = {
        "results": results,
        "groups": groups,
        "intrinsic": intrinsic,
        "configs": configs,
        "versions": versions,
        "n-samples": n_samples,
        "model": {"target": str(target), "source": loaded.source, "base_model": cfg.model.name,
                  "run_dir": str(run_dir) if run_dir else None, "checkpoint_sha256": weights_hash,
                  "dtype": cfg.model.dtype,
                  "n_params": sum(p.numel() for p in model.parameters())},
        "suite": {"name": suite, "version": SUITE_VERSION, "seed": seed, "settings": dataclasses.asdict(settings),
                  "description": SUITES[suite][2] if suite in SUITES else "lm-evaluation-harness tasks",
                  **({"lm_eval_version": fingerprint["lm_eval"]["version"]} if lm_eval_tasks else {})},
        "aggregation": "groups and overall are macro averages over tasks; " + (
            "acc = pass@1 = each task's headline lm-eval metric (results.<task>.metric), acc_stderr its stderr"
            if lm_eval_tasks else "acc = greedy thought, pass@1 = mean over the sampled thoughts") +
            " (accuracies are fractions in [0, 1])",
        "fingerprint": fingerprint,
        "provenance": runio.provenance(device=str(dev), torch_threads=torch.get_num_threads()),
        "date": runio.now(),
        "total_evaluation_time_seconds": round(wall, 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    runio.atomic_write_text(samples_beside(out), "".join(json.dumps(r, default=str) + "\n" for r in records))
    runio.write_json(out, result)
    overall = groups.get("overall", {})
    ppl, gain = intrinsic.get("heldout_perplexity"), intrinsic.get("heldout_info_gain")
    log(f"overall acc {_pct(overall.get('acc'))}  pass@1 {_pct(overall.get('pass@1'))}  held-out ppl "
        f"{'n/a' if ppl is None else f'{ppl:.2f}'}  info gain {'n/a' if gain is None else f'{gain:+.4f}'}  "
        f"({wall:.1f} s) -> {out}")
    return result


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _logger(verbose: bool):
    if not verbose:
        return lambda *_: None
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return lambda msg: console.print(msg)


def register(app) -> None:
    import typer

    @app.command("eval")
    def eval_command(
        target: str = typer.Argument(..., help="A run folder (uses final/ and config.yaml) or a model: tiny, "
                                               "smollm2-135m, a local folder or .gguf file."),
        suite: str = typer.Option("quick", "--suite", help="quick | full | lm-eval:TASK1,TASK2 (needs lm-eval; "
                                  "the local tasks rlp_addition, rlp_addition_mc run offline)."),
        out: Optional[Path] = typer.Option(None, "--out", help="eval.json path (default: RUN/eval.json, or "
                                                               "evals/<model>-<suite>/eval.json)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
        seed: int = typer.Option(0, "--seed", help="Evaluation seed: picks the problems and the sampled thoughts."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="An eval setting (n_per_task, samples, "
                                                 "thought_tokens, answer_tokens, temperature, think, tasks, "
                                                 "heldout_windows, ...) or a run-config key (data.corpus=...)."),
        force: bool = typer.Option(False, "--force", help="Evaluate again even if eval.json matches."),
    ):
        """Evaluate a run or a model: task accuracy (greedy, pass@1) and held-out perplexity / information gain."""
        evaluate(target, suite=suite, out=out, device=device, seed=seed, overrides=list(set_ or []),
                 reuse=not force, verbose=True)
