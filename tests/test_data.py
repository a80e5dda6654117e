"""Corpora, the held-out split and the position rules."""

import json

import numpy as np
import pandas as pd
import pytest

from rlp_cli.data import (arithmetic_steps, general_documents, is_heldout, load_documents, reasoning_documents,
                          select_positions, split_documents)
from rlp_cli.errors import UserError


def test_local_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("First doc line.\nStill first.\n\nSecond doc.\n\n\nThird.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json doc"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pd.DataFrame({"body": ["pq one", "pq two"]}).to_parquet(tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "a.txt"), 0, 0) == ["First doc line.\nStill first.", "Second doc.", "Third."]
    assert len(load_documents(str(tmp_path / "a.txt"), 0, 0, txt_split="file")) == 1
    assert load_documents(str(tmp_path / "b.jsonl"), 0, 0) == ["json doc", "two"]
    assert load_documents(str(tmp_path / "c.parquet"), 0, 0, text_field="body") == ["pq one", "pq two"]
    with pytest.raises(UserError, match="text_field"):
        load_documents(str(tmp_path / "c.parquet"), 0, 0)
    with pytest.raises(UserError, match="no such file"):
        load_documents(str(tmp_path / "missing.txt"), 0, 0)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1"):
        load_documents(str(tmp_path / "bad.jsonl"), 0, 0)


def test_builtin_corpora_are_deterministic_and_real():
    a, b = reasoning_documents(40, seed=1), reasoning_documents(40, seed=1)
    assert a == b and len(a) == 40
    assert reasoning_documents(40, seed=2) != a
    assert all(d.startswith("Question: ") and "\nAnswer: " in d for d in a)
    assert sum("Working: " in d for d in a) >= 10  # worked problems, not just Q/A
    g = general_documents(50, seed=0)
    assert len(g) == 50 and all(len(d) >= 300 and "<" not in d[:50] for d in g)


def test_arithmetic_working_is_correct():
    assert arithmetic_steps("4 - 1 - 7") == "4 - 1 - 7 = 3 - 7 = -4"
    assert arithmetic_steps("( 56 + -33 ) - 84").endswith("= 23 - 84 = -61")
    assert arithmetic_steps("12 / 4 * 3").endswith("= 9")


def test_heldout_split_is_by_hash():
    docs = [f"document number {i}" for i in range(400)]
    train, held = split_documents(docs, 0.1)
    assert 20 < len(held) < 60 and len(train) + len(held) == 400
    assert set(held) == {d for d in docs if is_heldout(d, 0.1)}
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(held))  # order-independent


def test_position_rules():
    rng = np.random.default_rng(0)
    one = select_positions("random_one", 100, 8, 99, rng)
    assert len(one) == 1 and 8 <= one[0] <= 99
    assert select_positions("stride", 100, 8, 99, rng, stride=16, cap=100) == [8, 24, 40, 56, 72, 88]
    assert len(select_positions("all", 100, 8, 99, rng, cap=4)) == 4
    assert select_positions("all", 12, 8, 11, rng, cap=10) == [8, 9, 10, 11]
    lp = np.zeros(100)
    lp[[30, 70]] = [-9.0, -5.0]
    assert select_positions("surprise", 100, 8, 99, rng, k=2, ema_logprobs=lp) == [30, 70]
    assert select_positions("random_one", 5, 8, 4, rng) == []
