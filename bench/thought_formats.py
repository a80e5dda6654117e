"""What a thought format costs before any thought is written: the empty-thought cost on smollm2-135m.

    .venv/bin/python bench/thought_formats.py            (about a minute on a 2-core CPU; prints a table)

For 32 positions of each corpus it scores the true next token x_t three ways with the untrained model:
no thought (s_nothink), and after an empty thought in each format (s_empty). The cost is
s_nothink - s_empty in nats: what the format alone takes from the reward before the thought's content
can give anything back. `p(close)` is the probability of the closing delimiter right after the opening
one, on the general corpus: how readily the model ends a thought. docs/method.md discusses the numbers.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from rlp_cli.data import arithmetic_documents, load_documents
from rlp_cli.models import load_model

N = 32
NEWLINE, BLANK_LINE = "\n", "\n\n"


def main() -> None:
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model.eval(), loaded.tokenizer
    open_id, close_id = loaded.think_open_id, loaded.think_close_id
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731

    corpora = {}
    items = []
    for doc in arithmetic_documents(N, seed=0):
        question, answer = doc.rsplit("Answer: ", 1)
        prefix = enc(question + "Answer: ")
        items.append((prefix, enc(question + "Answer: " + answer)[len(prefix)]))
    corpora["arithmetic (first answer digit)"] = items
    rng = np.random.default_rng(0)
    items = []
    for doc in load_documents("general", 2 * N, 0)[:N]:
        ids = enc(doc)[:128]
        t = int(rng.integers(8, len(ids) - 1))
        items.append((ids[:t], ids[t]))
    corpora["general (random position)"] = items

    text_open, text_close = enc("\n\nThink:"), enc(BLANK_LINE)[0]

    def formats(m):
        return {
            "<think> </think>, the paper's literal format": (lambda p: p + [open_id], lambda p: [close_id]),
            "<think> </think> + restate 4 (the default)": (lambda p: p + [open_id], lambda p: [close_id] + p[-4:]),
            "<think> </think> + restate 8": (lambda p: p + [open_id], lambda p: [close_id] + p[-8:]),
            "plain text '\\n\\nThink:' ... '\\n\\n'": (lambda p: p + text_open, lambda p: [text_close]),
            "plain text + restate 4": (lambda p: p + text_open, lambda p: [text_close] + p[-4:]),
        }

    @torch.no_grad()
    def scores(m, rows):
        return np.array([float(torch.log_softmax(m(torch.tensor([s])).logits[0, -1].float(), -1)[t]) for s, t in rows])

    @torch.no_grad()
    def p_close(m, opener, closer):
        return float(np.mean([float(torch.softmax(m(torch.tensor([opener(p)])).logits[0, -1].float(), -1)[closer])
                              for p, _ in corpora["general (random position)"][:16]]))

    # The alternative initialisation of the new tags: copy the rows of tokens that already mean "break".
    relaid = copy.deepcopy(model)
    with torch.no_grad():
        emb = relaid.get_input_embeddings().weight  # tied to the output layer in SmolLM2
        emb[close_id] = emb[enc(BLANK_LINE)[0]]
        emb[open_id] = emb[enc(NEWLINE)[0]]

    print(f"{'format':52} {'tag init':16} " + " ".join(f"{name[:28]:>30}" for name in corpora))
    for init, m in (("mean of pieces", model), ("from '\\n','\\n\\n'", relaid)):
        for name, (opener, closer) in formats(m).items():
            if init != "mean of pieces" and "plain" in name:
                continue  # plain text uses no new tokens
            cells = []
            for rows in corpora.values():
                base = scores(m, rows)
                empty = scores(m, [(opener(p) + closer(p), t) for p, t in rows])
                cells.append(f"cost {np.mean(base - empty):5.2f} (s_empty {np.mean(empty):6.2f})")
            print(f"{name:52} {init:16} " + " ".join(f"{c:>30}" for c in cells))
    print()
    print(f"p(</think> right after <think>), mean-of-pieces init: {p_close(model, lambda p: p + [open_id], close_id):.1e}")
    print(f"p(</think> right after <think>), '\\n\\n' init:       {p_close(relaid, lambda p: p + [open_id], close_id):.1e}")
    print(f"p('\\n\\n' right after '\\n\\nThink:'):                  {p_close(model, lambda p: p + text_open, text_close):.1e}")


if __name__ == "__main__":
    main()
