"""Synthetic Llama checkpoints of any size, written one block at a time (never held whole).

For the streamed-quantization tests and the scaling benchmark: a model whose float32
weights are several times the memory a quantization step may use can be made on any
machine, since only one block's tensors exist in memory while it is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SyntheticLlama", "write_synthetic_llama"]


@dataclass(frozen=True)
class SyntheticLlama:
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 8
    heads: int = 16
    kv_heads: int = 16
    vocab: int = 4096
    tie_embeddings: bool = False

    def config(self) -> Any:
        import transformers

        return transformers.LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
            max_position_embeddings=512, tie_word_embeddings=self.tie_embeddings, architectures=["LlamaForCausalLM"],
        )

    def block_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        h, i, d = self.hidden, self.intermediate, self.hidden // self.heads
        p = f"model.layers.{k}."
        return {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (self.heads * d, h),
            p + "self_attn.k_proj.weight": (self.kv_heads * d, h),
            p + "self_attn.v_proj.weight": (self.kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, self.heads * d),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }

    def outer_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"model.embed_tokens.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    @property
    def n_params(self) -> int:
        shapes = [*self.outer_shapes().values()]
        shapes += [s for k in range(self.layers) for s in self.block_shapes(k).values()]
        total = 0
        for s in shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.n_params


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen)


def write_synthetic_llama(path: str | os.PathLike[str], spec: SyntheticLlama, *, seed: int = 0) -> Path:
    """A transformers Llama directory (config.json, one safetensors shard a block, an index)."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    spec.config().save_pretrained(root)
    gen = torch.Generator().manual_seed(seed)
    groups = [spec.outer_shapes()] + [spec.block_shapes(k) for k in range(spec.layers)]
    weight_map: dict[str, str] = {}
    total = 0
    for g, shapes in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _tensor(n, s, gen) for n, s in shapes.items()}
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: fname for n in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return root
