"""Local lm-evaluation-harness tasks: problems rlp generates itself, so `--suite lm-eval:...` runs offline.

- `rlp_addition`: two-digit sums, generate_until: the greedy answer up to the first newline, stripped,
  must equal the sum (exact_match).
- `rlp_addition_mc`: the same problems as a 4-way multiple choice (the sum, and three of sum +-1,
  sum +-10), scored by log-likelihood (acc): a random model is at 25%.

The prompt is the built-in `arithmetic` corpus's layout, "Question: What is 47 + 38?\\nAnswer:", with
the answer after one space. The problems come from a fixed string-seeded random.Random, not from
the corpus's numpy stream; there are only 8,100 pairs, so a model trained on that corpus has seen
some of them: this measures addition, not recall of held-out facts.

write_tasks() writes the data (jsonl) and the task YAMLs (dataset_path: json, data_files = that
jsonl by absolute path) into a folder that lm-eval's TaskManager(include_path=...) indexes; the
files are rewritten only when their content changes, so concurrent evaluations agree.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import yaml

VERSION = 1  # bump when the problems, the prompts or the scoring change
N_PROBLEMS = 40
DATA_FILE = "rlp_addition.jsonl"
TASKS = {
    "rlp_addition": "two-digit sums, greedy answer up to a newline, exact match (generate_until)",
    "rlp_addition_mc": "two-digit sums, 4-way multiple choice by log-likelihood (acc; chance 25%)",
}
PROMPT = "Question: {{question}}\nAnswer:"  # Jinja, as lm-eval renders doc_to_text


def problems(n: int = N_PROBLEMS) -> list[dict]:
    """The task's documents: the same for the same VERSION and n, on every machine and Python >= 3.2."""
    rng = random.Random(f"rlp_addition-v{VERSION}")
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        s = a + b
        choices = [s] + rng.sample([s - 10, s - 1, s + 1, s + 10], 3)
        rng.shuffle(choices)
        rows.append({"id": i, "a": a, "b": b, "question": f"What is {a} + {b}?", "answer": str(s),
                     "choices": [str(c) for c in choices], "label": choices.index(s)})
    return rows


def task_configs(data_file: Path) -> dict[str, dict]:
    """The lm-eval task configs (YAML content) over a local jsonl file, by task name."""
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "doc_to_text": PROMPT,
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metadata": {"version": float(VERSION)},
    }
    return {
        "rlp_addition": {
            "task": "rlp_addition", **common, "output_type": "generate_until", "doc_to_target": "answer",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
            # strip the answer (the continuation starts with the space after "Answer:")
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        },
        "rlp_addition_mc": {
            "task": "rlp_addition_mc", **common, "output_type": "multiple_choice", "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
    }


def default_folder() -> Path:
    from rlp_cli.models import cache_root

    return cache_root() / "lm_eval_tasks" / f"v{VERSION}"


def write_tasks(folder: Optional[Path] = None) -> Path:
    """Write the jsonl and one YAML per task into `folder` (default: the rlp cache); return the folder."""
    from rlp_cli.runio import atomic_write_text

    folder = Path(folder) if folder is not None else default_folder()
    data = folder / DATA_FILE
    files = {data: "".join(json.dumps(r, sort_keys=True) + "\n" for r in problems())}
    for name, config in task_configs(data).items():
        files[folder / f"{name}.yaml"] = yaml.safe_dump(config, sort_keys=False)
    for path, text in files.items():
        try:
            if path.read_text() == text:
                continue
        except OSError:
            pass
        atomic_write_text(path, text)
    return folder
