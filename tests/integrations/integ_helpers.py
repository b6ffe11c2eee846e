"""Helpers for the integration tests: tiny Llama models, configs that fit them, fake statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lqmod
from lqmod.types import LayerStats

transformers = pytest.importorskip("transformers")

# Configs that fit 64/128-wide layers and run in well under a second per layer; a quantizer
# registered by a third party is tried with its defaults.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "nf": {},
    "optq": {"group_size": 32},
    "rtn": {"group_size": 32},
    "lq": {"rank": 4, "max_iters": 3},
    "lq-fisher": {"rank": 4, "max_iters": 3},
    "quip": {},
}
# q_proj is square (64x64), down_proj is not (64x128): both layouts get covered.
TARGETS = {"include": [r"layers\.0\.self_attn\.q_proj$", r"layers\.0\.mlp\.down_proj$"]}


def tiny_config(layers: int = 2) -> Any:
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False,
    )


def tiny_llama(layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model: nn.Module = transformers.LlamaForCausalLM(tiny_config(layers)).eval()
    return model


def fake_stats(model: nn.Module, names: list[str], seed: int = 1) -> dict[str, LayerStats]:
    """Well-conditioned Hessians and positive Fisher diagonals: valid input for any quantizer."""
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for name in names:
        w = model.get_parameter(f"{name}.weight")
        x = torch.randn(256, w.shape[1], generator=g, dtype=torch.float64)
        stats[name] = LayerStats(hessian=x.T @ x, n_tokens=256, fisher=torch.rand(w.shape, generator=g) + 0.1)
    return stats


def all_quantizers() -> list[str]:
    return sorted(lqmod.get_registry().quantizers())


class SavedTensors:
    """Shape and dtype of every tensor autograd saves while recording, except the model's own
    parameters and buffers (a frozen dense layer's weight is saved for its input gradient, but
    it is resident anyway: only a tensor made for the occasion costs memory)."""

    def __init__(self, model: nn.Module) -> None:
        self.resident = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in self.resident:
            self.saved.append((tuple(t.shape), t.dtype))
        return t


@contextlib.contextmanager
def record_saved(model: nn.Module) -> Iterator[SavedTensors]:
    rec = SavedTensors(model)
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        yield rec


def quantized_pair(quantizer: str, *, layers: int = 1, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(a tiny Llama with its TARGETS quantized by ``quantizer``, a dense twin whose same layers hold
    the materialized quantized weights): both compute the same function."""
    from lqmod.integrations.base import quantize_linears, resolve_entries
    from lqmod.nn import QuantizedLinear

    model = tiny_llama(layers, seed)
    dense = tiny_llama(layers, seed)
    names = list(resolve_entries(model, quantizer, None, targets=TARGETS))
    quantize_linears(
        model, quantizer, SMALL_CONFIGS.get(quantizer, {}), targets=TARGETS, stats=fake_stats(model, names)
    )
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            assert isinstance(layer, QuantizedLinear)
            dense.get_parameter(f"{name}.weight").copy_(layer.dequantize(torch.float32))
    return model, dense


WORDS = (
    'the', 'a', 'of', 'to', 'and', 'in', 'is', 'was', 'for', 'on', 'with', 'as', 'by', 'at', 'from', 'that',
    'this', 'it', 'be', 'are', 'were', 'an', 'or', 'which', 'his', 'her', 'their', 'city', 'river', 'music',
    'film', 'team', 'game', 'year', 'house', 'king', 'war', 'world', 'school', 'church', 'station', 'road',
    'people', 'water', 'light', 'small', 'large', 'early', 'late', 'first', 'second', 'new', 'old', 'great',
    'long', 'high', 'north', 'south', 'east', 'west', 'played', 'built', 'wrote', 'opened', 'moved', 'called',
    'became', 'made', 'took', 'gave', 'found', 'said', 'held', 'won', 'lost', 'began', 'ended',
)


def save_word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer over WORDS (ids < 101, the tiny models' vocabulary), and a text file of
    sentences in it: calibration text a tiny model can read."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    assert len(vocab) <= 101
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(40)]
    text = path / "calibration.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return text
