"""The built-in evaluation suites: which problems, how an answer scores, how scores aggregate.

- Task suites built from reasoning-gym generators at fixed seeds, in two groups like the paper's
  averages: `math` (arithmetic and word problems) and `logic` (syllogisms, kinship, string tasks: no
  arithmetic). Every answer is scored by the generator's own `score_answer`; an answer counts as
  correct when it scores 1.
- Evaluation seeds never meet training seeds: reasoning-gym seeds item i of a dataset with seed s by
  Random(s + i); training corpora start at run seed + data.CORPUS_SEED_OFFSET, evaluation suites at
  EVAL_SEED_BASE, two billion, with a disjoint block of seeds per (eval seed, task).
- Aggregation follows lm-evaluation-harness: per task acc (greedy) and pass@1 with the standard error
  of the mean; groups and overall are macro averages over tasks.

How the model is run on them is rlp_cli/evaluate.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from rlp_cli.errors import UserError

SUITE_VERSION = 3  # bump when a task, its generator settings, the template or the sampled random stream changes
# 2: generation runs on the trainer's engine (rollout.decode): thoughts are drawn by its inverse-CDF sampler, for
#    the sampled rows only, in batches across tasks ordered by prompt length, so sampled thoughts (pass@1,
#    information gain) differ from version 1; greedy rows are the same up to float ties between batch shapes.
# 3: thoughts, greedy and sampled, never contain the tokens the trainer's policy cannot write (models.banned_ids:
#    EOS, chat-control tokens, <think>); SmolLM2-135M-Instruct had put one in 20 of the quick suite's 80
#    greedy thoughts.
EVAL_SEED_BASE = 2_000_000_000  # far from training seeds (run seed + 1_000_003 + task index + item index)
SEED_STRIDE = 100_000  # seed block per eval --seed value
TASK_STRIDE = 5_000  # seed block per task inside it, so also the most items a task may have
QUESTION_TEMPLATE = "Question: {question}\n"  # the layout of the built-in reasoning corpus's documents
ANSWER_PREFIX = "Answer:"


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
