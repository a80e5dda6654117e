import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("RLP_NUM_THREADS"):
    # Tests that call rlp functions directly (not through a command) get the same thread count as the
    # commands: on a busy 2-core machine, default threads made a 2 s test take 2 minutes.
    from rlp_cli.models import configure_cpu  # noqa: E402

    configure_cpu(None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny model (random 2-layer Llama + locally trained BPE), loaded once."""
    from rlp_cli.models import load_model

    return load_model("tiny")
