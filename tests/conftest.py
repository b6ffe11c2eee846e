"""Shared fixtures. Tests run offline: no model or dataset hub is reachable."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import lqmod

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast


# LQMOD_TEST_TIMES=path appends one line per test: node id, wall seconds, this process's CPU
# seconds, children's CPU seconds (setup and teardown included, so a shared fixture is charged
# to the first test that uses it). CPU time ranks the slow tests even on a machine shared
# with other work, where --durations' wall clock mostly measures the other work; lines are
# written as each test ends, so an interrupted run still leaves its ranking.
_TIMES = os.environ.get("LQMOD_TEST_TIMES")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if not _TIMES:
        yield
        return
    wall, cpu, before = time.perf_counter(), time.process_time(), os.times()
    yield
    after = os.times()
    children = after.children_user + after.children_system - before.children_user - before.children_system
    with open(_TIMES, "a", encoding="utf-8") as f:
        f.write(f"{item.nodeid}\t{time.perf_counter() - wall:.2f}\t{time.process_time() - cpu:.2f}\t{children:.2f}\n")


@pytest.fixture
def registry() -> lqmod.Registry:
    return lqmod.get_registry()


@pytest.fixture
def nf_spec(registry: lqmod.Registry) -> lqmod.QuantizerSpec:
    return registry.quantizer("nf")


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    try:
        from lqmod.hf import resolve_model

        return str(resolve_model("minilm").path)
    except FileNotFoundError as exc:
        pytest.skip(f"real MiniLM weights unavailable: {exc}")


# A word-level tokenizer over a small text, for causal-LM tests on tiny_llama (vocab 101).
TEXT = (
    "the quick brown fox jumps over the lazy dog . a quantized model learns a small adapter . "
    "low rank updates train while the base weight stays frozen and quantized . "
    "perplexity falls as the adapter learns the text . the dog sleeps and the fox runs . "
) * 6


@pytest.fixture(scope="session")
def train_text() -> str:
    return TEXT


@pytest.fixture(scope="session")
def word_tokenizer() -> PreTrainedTokenizerFast:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = sorted(set(re.findall(r"\S+", TEXT)))
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.pad_token = fast.eos_token
    assert len(vocab) <= 101  # fits tiny_llama's vocabulary
    return fast
