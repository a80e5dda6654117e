"""`rlp eval`: task accuracy and intrinsic metrics of a trained run (or any model), as eval.json.

What is measured
- Task suites built from reasoning-gym generators at fixed seeds, in two groups like the paper's
  averages: `math` (arithmetic and word problems) and `logic` (syllogisms, kinship, string tasks: no
  arithmetic). The model thinks with the trainer's template,

      thought_prompt + "Question: <q>\\n" + <think> thought </think> + "Answer:" answer \\n

  one greedy thought (-> `acc`) and k sampled thoughts (-> `pass@1`, the mean over the k), each
  followed by a greedy answer that ends at the first newline. Every answer is scored by the
  generator's own `score_answer`; an answer counts as correct when it scores 1.
- Intrinsic metrics on the held-out split of the run's training corpus: no-think perplexity, and the
  mean information gain log p(x_t | x_<t, thought) - log p(x_t | x_<t) of sampled thoughts. No EMA
  teacher exists after training, so the no-think baseline is the evaluated model itself.
- `--suite lm-eval:TASK1,TASK2`: hands the loaded model to lm-evaluation-harness (HFLM) when it is
  installed; its local tasks rlp_addition and rlp_addition_mc (lm_eval_tasks.py) run offline. Each
  task's headline metric and stderr land in `results` like a built-in task's, with lm-eval's version.

The output follows lm-evaluation-harness's results layout (results, groups, configs, versions,
n-samples) plus provenance; per-sample outputs go to eval_samples.jsonl beside eval.json.
Evaluation seeds never meet training seeds: reasoning-gym seeds item i of a dataset with seed s by
Random(s + i); training corpora start at run seed + data.CORPUS_SEED_OFFSET, evaluation suites at
EVAL_SEED_BASE, two billion, with a disjoint block of seeds per (eval seed, task).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rlp_cli import runio
from rlp_cli.errors import UserError
from rlp_cli.runfolder import RunFolder, samples_beside

if TYPE_CHECKING:
    from rlp_cli.train import PhaseTimer

SUITE_VERSION = 3  # bump when a task, its generator settings, the template or the sampled random stream changes
# 2: generation runs on the trainer's engine (rollout.decode): thoughts are drawn by its inverse-CDF sampler, for
#    the sampled rows only, in batches across tasks ordered by prompt length, so sampled thoughts (pass@1,
#    information gain) differ from version 1; greedy rows are the same up to float ties between batch shapes.
EVAL_SEED_BASE = 2_000_000_000  # far from training seeds (run seed + 1_000_003 + task index + item index)
SEED_STRIDE = 100_000  # seed block per eval --seed value
TASK_STRIDE = 5_000  # seed block per task inside it, so also the most items a task may have
QUESTION_TEMPLATE = "Question: {question}\n"  # the layout of the built-in reasoning corpus's documents
ANSWER_PREFIX = "Answer:"
BASELINE_NOTE = ("no EMA teacher exists after training: the no-think baseline of the information gain is the "
                 "evaluated model itself, scoring the same token without a thought")


@dataclass(frozen=True)
class Task:
    name: str  # a reasoning-gym generator
    group: str  # math | logic
    generator_config: dict = field(default_factory=dict)  # difficulty settings passed to create_dataset


# Easier settings than the generators' defaults, so that a 135M model on a CPU is not at 0% everywhere.
QUICK_TASKS = [
    Task("chain_sum", "math", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    Task("basic_arithmetic", "math", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2,
                                      "operators": ("+", "-", "*"), "allow_parentheses": False,
                                      "allow_negation": False}),
    Task("products", "math", {"min_digits": 1, "max_digits": 2}),
    Task("gsm_symbolic", "math"),
    Task("gcd", "math", {"max_value": 100}),
    Task("simple_equations", "math", {"max_terms": 2, "max_value": 20}),
    Task("syllogism", "logic"),
    Task("family_relationships", "logic", {"max_family_size": 6}),
    Task("letter_counting", "logic", {"max_words": 8}),
    Task("spell_backward", "logic", {"max_word_len": 6}),
]
# The generators' default settings: the distribution the built-in reasoning corpus is drawn from.
FULL_TASKS = [Task(t.name, t.group) for t in QUICK_TASKS if t.group == "math"] + [
    Task("lcm", "math"), Task("prime_factorization", "math")] + [
    Task(t.name, t.group) for t in QUICK_TASKS if t.group == "logic"] + [Task("number_sorting", "logic")]


@dataclass
class SuiteSettings:
    """Everything that changes the numbers; each key can be set with --set key=value."""
    n_per_task: int = 8  # problems per task
    samples: int = 2  # k sampled thoughts per problem for pass@1 (besides the greedy one)
    thought_tokens: int = 16  # thought length limit
    answer_tokens: int = 16  # answer length limit (the answer also ends at a newline)
    temperature: float = 0.7  # for the sampled thoughts
    think: bool = True  # false: answer right after the question, no thought
    # problems per generation batch (each becomes 1 + samples rows), drawn across tasks (run_suite). The quick
    # suite on SmolLM2, 2 CPU threads: 45 s at 16, 29-38 s at 40 or 80 (80 holds twice the cache)
    batch_size: int = 40
    tasks: Optional[list[str]] = None  # a subset of the suite's tasks
    heldout_windows: int = 16  # held-out windows for the perplexity (0 skips the intrinsic metrics)
    info_gain_contexts: int = 16  # held-out positions that get sampled thoughts
    info_gain_rollouts: int = 4  # thoughts per position
    lm_eval_limit: Optional[int] = None  # lm-eval: examples per task (None: all)
    lm_eval_batch_size: int = 8
    lm_eval_include_path: Optional[str] = None  # lm-eval: a folder of extra task YAMLs (e.g. local benchmark files)


SUITES: dict[str, tuple[list[Task], SuiteSettings, str]] = {
    "quick": (QUICK_TASKS, SuiteSettings(),
              "10 tasks x 8 problems, easy generator settings, 16-token thoughts, greedy + pass@1 over 2 samples: "
              "seconds on `tiny`, about a minute for smollm2-135m on 2 CPU cores"),
    "full": (FULL_TASKS, SuiteSettings(n_per_task=100, samples=4, thought_tokens=256, answer_tokens=32,
                                       batch_size=32, heldout_windows=512, info_gain_contexts=128,
                                       info_gain_rollouts=8),
             "13 tasks x 100 problems at the generators' default settings (the training corpus's distribution), "
             "256-token thoughts, pass@1 over 4 samples: for GPUs"),
}


# --------------------------------------------------------------------------------------------
# Suites


@dataclass
class Problem:
    task: str
    group: str
    index: int
    seed: int  # the reasoning-gym dataset seed (item i is generated from Random(seed + i))
    question: str
    answer: str
    entry: dict  # the generator's item, needed by its score_answer


def task_seed(eval_seed: int, task_index: int) -> int:
    if not 0 <= eval_seed < (2**31 - EVAL_SEED_BASE) // SEED_STRIDE:
        raise UserError(f"--seed {eval_seed}: evaluation seeds must be between 0 and "
                        f"{(2**31 - EVAL_SEED_BASE) // SEED_STRIDE - 1}. Fix: pick a small non-negative seed.")
    return EVAL_SEED_BASE + eval_seed * SEED_STRIDE + task_index * TASK_STRIDE


def make_datasets(tasks: list[Task], n_per_task: int, seed: int) -> dict[str, Any]:
    """One reasoning-gym dataset per task, fixed by (suite task order, eval seed)."""
    import reasoning_gym

    if not 1 <= n_per_task <= TASK_STRIDE:
        raise UserError(f"n_per_task={n_per_task}: must be between 1 and {TASK_STRIDE}. Fix: --set n_per_task=8.")
    datasets = {}
    for i, task in enumerate(tasks):
        datasets[task.name] = reasoning_gym.create_dataset(task.name, size=n_per_task, seed=task_seed(seed, i),
                                                           **task.generator_config)
    return datasets


def build_suite(name: str, seed: int = 0, settings: SuiteSettings | None = None) -> tuple[list[Problem], dict]:
    """The problems of a suite and the datasets that score them; the same for the same (name, seed, settings)."""
    tasks, defaults, _ = SUITES[name]
    settings = settings or defaults
    tasks = select_tasks(tasks, settings.tasks)
    datasets = make_datasets(tasks, settings.n_per_task, seed)
    problems = []
    for task in tasks:
        ds = datasets[task.name]
        for i in range(settings.n_per_task):
            entry = ds[i]
            problems.append(Problem(task.name, task.group, i, ds.seed, entry["question"], str(entry["answer"]), entry))
    return problems, datasets


def select_tasks(tasks: list[Task], names: list[str] | None) -> list[Task]:
    if not names:
        return list(tasks)
    known = {t.name: t for t in tasks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--set tasks: unknown task(s) {', '.join(unknown)} for this suite. Fix: choose from "
                        f"{', '.join(known)}.")
    return [t for t in tasks if t.name in names]


def extract_answer(generated: str) -> str:
    """The answer is the first non-blank line of the generated text, without surrounding spaces."""
    return next((line.strip() for line in generated.split("\n") if line.strip()), "")


def score(dataset, entry: dict, generated: str) -> tuple[str, float, bool]:
    """(extracted answer, the generator's own score, correct). A checker that raises on garbage scores 0."""
    answer = extract_answer(generated)
    try:
        value = float(dataset.score_answer(answer, entry))
    except Exception:  # e.g. prime_factorization's int() on a non-number
        value = 0.0
    return answer, value, value >= 1.0 - 1e-9


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
    from rlp_cli.rollout import Cursor, _left_pad, decode

    phase = clock or (lambda _: contextlib.nullcontext())
    device = next(model.parameters()).device
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    rows_per_prompt = 1 + samples
    n = len(prompts) * rows_per_prompt
    greedy_row = torch.arange(n, device=device) % rows_per_prompt == 0
    with torch.no_grad():
        with phase("prefill"):
            ids, mask = _left_pad(prompts, pad_id, device)
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
# Aggregation (lm-evaluation-harness style)


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample std (ddof=1), as lm-evaluation-harness reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def aggregate(records: list[dict], groups_of: dict[str, str]) -> tuple[dict, dict]:
    """Per task: acc (greedy), pass@1 (mean over the k samples, then over problems), stderrs, n.

    Groups and overall: macro averages over their tasks (each task weighs the same)."""
    results = {}
    for task, group in groups_of.items():
        rows = [r for r in records if r["task"] == task]
        greedy = [float(r["correct"]) for r in rows if r["sample"] == "greedy"]
        if not greedy:
            continue
        per_problem: dict[int, list[float]] = {}
        for r in rows:
            if r["sample"] != "greedy":
                per_problem.setdefault(r["doc_id"], []).append(float(r["correct"]))
        pass1 = [sum(v) / len(v) for v in per_problem.values()] or greedy  # no samples: pass@1 is the greedy answer
        results[task] = {"acc": sum(greedy) / len(greedy), "acc_stderr": mean_stderr(greedy),
                         "pass@1": sum(pass1) / len(pass1), "pass@1_stderr": mean_stderr(pass1),
                         "score": sum(r["score"] for r in rows if r["sample"] == "greedy") / len(greedy),
                         "n": len(greedy), "k": max((len(v) for v in per_problem.values()), default=0),
                         "group": group}
    return results, group_averages(results)


def group_averages(results: dict) -> dict:
    groups: dict[str, list[str]] = {}
    for task, r in results.items():
        groups.setdefault(r["group"], []).append(task)
    groups["overall"] = list(results)
    out = {}
    for g, tasks in groups.items():
        entry = {"n_tasks": len(tasks), "tasks": tasks, "aggregation": "macro average over tasks"}
        for metric in ("acc", "pass@1"):
            vals = [results[t][metric] for t in tasks if results[t].get(metric) is not None]
            entry[metric] = sum(vals) / len(vals) if vals else None
        out[g] = entry
    return out


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
    """rollout.window_logprobs of the windows, 16 at a time (it drops the padding where that pays)."""
    from rlp_cli.rollout import window_logprobs

    return [lp for b in range(0, len(windows), 16) for lp in window_logprobs(model, windows[b:b + 16], pad_id)[0]]


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness bridge


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError("--suite lm-eval:...: lm-evaluation-harness is not installed. Fix: `pip install lm-eval` "
                        "(the built-in local tasks " + ", ".join(local_lm_eval_tasks()) + " run offline; the "
                        "harness's own benchmarks come from the Hugging Face hub: run them where they are cached or "
                        "the network is reachable, or point --set lm_eval_include_path at task YAMLs over local "
                        "files), or use a built-in suite (quick, full).") from None
    return lm_eval


def local_lm_eval_tasks() -> dict[str, str]:
    from rlp_cli import lm_eval_tasks

    return lm_eval_tasks.TASKS


def lm_eval_version(lm_eval=None) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(lm_eval, "__version__", "unknown"))


def lm_eval_task_manager(tasks: list[str], settings: SuiteSettings):
    """lm-eval's TaskManager that knows `tasks`: rlp's local tasks, then --set lm_eval_include_path's (which win
    on a name clash), and lm-eval's own only when a task is not among those (indexing them takes ~15 s on a CPU).
    A UserError names any requested task that none of them has."""
    from rlp_cli import lm_eval_tasks

    require_lm_eval()
    from lm_eval.tasks import TaskManager

    include = [str(lm_eval_tasks.write_tasks())]
    if settings.lm_eval_include_path:
        include.append(str(Path(settings.lm_eval_include_path).expanduser()))
    local = TaskManager(include_path=include, include_defaults=False)
    if all(t in local.all_subtasks for t in tasks):  # plain tasks, not groups that may name lm-eval's own
        return local
    task_manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise UserError(f"--suite lm-eval:{','.join(tasks)}: lm-evaluation-harness knows no task {', '.join(unknown)}. "
                        f"Fix: use its task names (`lm_eval ls tasks`), rlp's local tasks "
                        f"({', '.join(lm_eval_tasks.TASKS)}), or task YAMLs in --set lm_eval_include_path=FOLDER.")
    return task_manager


def run_lm_eval(model, tokenizer, tasks: list[str], seed: int, settings: SuiteSettings, task_manager=None):
    """Run lm-evaluation-harness's simple_evaluate on a loaded model; return our schema's parts.

    The model and tokenizer are the ones rlp loaded (a run's final/, a built-in name, a folder), handed
    to lm-eval's Hugging Face class (HFLM) as they are: no second load, and the weights evaluated are
    the ones eval.json hashes. Tasks: see lm_eval_task_manager."""
    import inspect

    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if task_manager is None:
        task_manager = lm_eval_task_manager(tasks, settings)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.lm_eval_batch_size)
    kwargs = dict(model=lm, tasks=tasks, limit=settings.lm_eval_limit, log_samples=True, task_manager=task_manager,
                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    accepted = inspect.signature(lm_eval.simple_evaluate).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}  # older harness versions lack some seeds
    out = lm_eval.simple_evaluate(**kwargs)
    if out is None:  # simple_evaluate returns None on non-zero ranks of a distributed run
        raise UserError("lm-evaluation-harness returned no results (a distributed run?). Fix: run rlp eval on one process.")
    return convert_lm_eval(out, lm_eval_version(lm_eval))


HEADLINE_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match,none",
                    "acc_norm,none", "pass@1,none", "pass_at_1,none")


def convert_lm_eval(out: dict, version: str | None = None) -> tuple[dict, dict, dict, dict, dict, list[dict]]:
    """lm-eval's output -> (results, groups, configs, versions, n-samples, sample records).

    Each task's headline metric becomes `acc` (the first of HEADLINE_METRICS it reports, else its
    first numeric metric) and its stderr `acc_stderr`; `metric` names it and `lm_eval_version` the
    harness that computed it. lm-eval scores one greedy answer, so pass@1 equals acc. All raw metrics are kept."""
    subtask_group = {}
    for group, subtasks in (out.get("group_subtasks") or {}).items():
        for t in subtasks:
            subtask_group.setdefault(t, group)
    results = {}
    for task, metrics in (out.get("results") or {}).items():
        if task in (out.get("group_subtasks") or {}) and (out["group_subtasks"][task]):
            continue  # a group's own row: we recompute group averages as macro averages below
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        key = next((k for k in HEADLINE_METRICS if k in numeric), None) or \
            next((k for k in numeric if "stderr" not in k), None)
        if key is None:
            continue
        name, _, filt = key.partition(",")
        stderr = numeric.get(f"{name}_stderr,{filt}")
        n = (out.get("n-samples") or {}).get(task, {}).get("effective")
        results[task] = {"acc": float(numeric[key]), "acc_stderr": None if stderr is None else float(stderr),
                         "pass@1": float(numeric[key]), "n": n, "k": 0, "metric": key,
                         "group": subtask_group.get(task, "lm-eval"), "lm_eval_version": version, "raw": metrics}
    samples = []
    for task, rows in (out.get("samples") or {}).items():
        for row in rows:
            samples.append({"task": task, "doc_id": row.get("doc_id"), "target": row.get("target"),
                            "response": row.get("filtered_resps"), **{k: row.get(k) for k in row.get("metrics", [])}})
    return (results, group_averages(results), out.get("configs") or {}, out.get("versions") or {},
            out.get("n-samples") or {}, samples)


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


def parse_settings(suite: str, overrides: list[str] | None) -> tuple[SuiteSettings, list[str]]:
    """Split --set items into suite settings (n_per_task=4, eval.samples=1) and run-config keys (data.corpus=...)."""
    from rlp_cli.config import parse_override

    base = SUITES[suite][1] if suite in SUITES else SUITES["quick"][1]
    settings = dataclasses.replace(base)
    names = {f.name: f for f in dataclasses.fields(SuiteSettings)}
    config_overrides = []
    for item in overrides or []:
        key, value = parse_override(item)
        short = key[5:] if key.startswith("eval.") else key
        if short not in names:
            if "." not in key:
                raise UserError(f"--set {item}: '{key}' is neither an evaluation setting ({', '.join(names)}) nor a "
                                "run-config key (section.key). Fix: use one of those names.")
            config_overrides.append(item)
            continue
        if short == "tasks" and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        default = getattr(base, short)
        expected = type(default) if default is not None else None
        if expected in (int, float) and isinstance(value, bool) or \
                expected is int and not isinstance(value, int) or \
                expected is float and not isinstance(value, (int, float)) or \
                expected is bool and not isinstance(value, bool):
            raise UserError(f"--set {item}: '{short}' must be a {expected.__name__}. Fix: e.g. --set {short}={default}.")
        setattr(settings, short, value)
    for key in ("n_per_task", "thought_tokens", "answer_tokens", "batch_size", "info_gain_rollouts"):
        if getattr(settings, key) < 1:
            raise UserError(f"--set {key}={getattr(settings, key)}: must be at least 1.")
    if settings.samples < 0 or settings.temperature <= 0:
        raise UserError("--set samples must be >= 0 and temperature > 0.")
    return settings, config_overrides


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
