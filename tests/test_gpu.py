"""CUDA checks (`make test-gpu`): the fast path against the naive one, bfloat16 training, DDP over nccl.

Every test here carries the `gpu` marker: conftest.py skips them where torch sees no CUDA device, and
`make test` (CPU CI) deselects them.
"""

import copy

import pytest
import torch

from rlp_cli.config import load_config

pytestmark = pytest.mark.gpu
G = 3


@pytest.fixture(scope="module")
def tiny_cuda():
    from rlp_cli.models import load_model

    return load_model("tiny", device=torch.device("cuda"))


def test_fast_equals_naive_on_cuda(tiny_cuda):
    from rlp_cli.rollout import Context, sample_thoughts
    from rlp_cli.update import policy_logprobs

    tok = tiny_cuda.tokenizer
    docs = ["Question: 12 + 30 = ?\nAnswer: 42", "The river runs north through the old valley and into the sea."]
    windows = [tok(d, add_special_tokens=False).input_ids for d in docs]
    contexts = [Context(prompt=w[:t] + [tiny_cuda.think_open_id], targets=w[t:t + 1], continuation=w[t:t + 8],
                        doc_index=i, position=t) for i, (w, t) in enumerate(zip(windows, [9, 5]))]
    ro = sample_thoughts(tiny_cuda.model, contexts, num_rollouts=G, max_thought_tokens=6, temperature=1.0,
                         close_id=tiny_cuda.think_close_id, pad_id=tok.pad_token_id,
                         generator=torch.Generator(device="cuda").manual_seed(0), score_targets=True)
    adv = torch.linspace(-1, 1, ro.seq.shape[0], device="cuda")
    results = {}
    for fast in (True, False):
        model = copy.deepcopy(tiny_cuda.model)
        lp, _, _ = policy_logprobs(model, contexts, ro, G, 1.0, tok.pad_token_id, fast=fast)
        m = ro.action_mask.float()
        (-((lp * m).sum(-1) / m.sum(-1) * adv).mean()).backward()
        results[fast] = (lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    m = ro.action_mask.bool()
    assert torch.allclose(results[True][0][m], results[False][0][m], atol=1e-4)
    for name, grad in results[True][1].items():
        assert torch.allclose(grad, results[False][1][name], atol=1e-4, rtol=1e-3), name


def test_bfloat16_training_on_cuda_keeps_float32_masters_and_stays_finite():
    from rlp_cli.train import Trainer

    trainer = Trainer(load_config("tiny", ["device=cuda", "model.dtype=bfloat16", "log.probe_every=0"]))
    assert trainer.device.type == "cuda" and trainer.master.copied
    for _ in range(3):
        metrics, _ = trainer.train_step()
        assert all(v == v for v in metrics.values() if isinstance(v, float))  # no NaN
    assert all(p.dtype == torch.float32 for p in trainer.master.params)
    assert all(p.dtype == torch.float32 for p in trainer.teacher.parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over nccl needs 2 GPUs")
def test_two_nccl_processes_train_as_one(tmp_path):
    from test_distributed import run_worker  # the worker that swaps in a split-invariant sampler

    [one] = run_worker(tmp_path, "rlp", 1, "cuda")
    two = run_worker(tmp_path, "rlp", 2, "cuda")
    for name, p in one["params"].items():
        assert torch.equal(two[0]["params"][name], two[1]["params"][name]), name
        assert torch.allclose(two[0]["params"][name], p, atol=1e-5, rtol=1e-4), name
