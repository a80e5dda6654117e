"""`rlp eval --suite lm-eval:TASK1,TASK2`: the loaded model handed to lm-evaluation-harness.

When the harness is installed, the model rlp loaded goes to its Hugging Face class (HFLM); its
local tasks rlp_addition and rlp_addition_mc (lm_eval_tasks.py) run offline. Each task's headline
metric and stderr land in eval.json's `results` like a built-in task's, with lm-eval's version.
"""

from __future__ import annotations

from pathlib import Path

from rlp_cli.errors import UserError
from rlp_cli.suites import SuiteSettings, group_averages


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
