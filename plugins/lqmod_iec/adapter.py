"""IR-QLoRA's information elastic connection (IEC; Qin et al., ICML 2024, "Accurate LoRA-Finetuning
Quantization of LLMs via Information Retention") beside LoRA's ``A`` and ``B``.

Two parameter-free paths let the low-rank bottleneck see the whole input and reach the whole
output, each gated by one learnable scalar (both start at 0, as in the authors' code, so
step 0 computes exactly what LoRA would):

    h = A dropout(x) + beta_A * G x           G x: mean of each of r consecutive groups of in/r inputs
    u = B h          + beta_B * R h           R h: each of the r entries repeated out/r times
    y = x W^T + s u + b,                      s = alpha / r

``G`` (r, in) and ``R`` (out, r) are never built in the forward (a reshape-and-mean and a
``repeat_interleave``); as matrices they give the merged weight ``W + s (B + beta_B R)(A + beta_A G)``.
The rank must divide both ``in_features`` and ``out_features``. As in the authors' code the
dropout applies to LoRA's ``A`` path only, not to the group means.

Written from the paper and the reference implementation (htqin/IR-QLoRA, ``utils.py``,
``lora_default_A_scale`` / ``lora_default_B_scale`` are ``beta_A`` / ``beta_B`` here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lqmod.config import LoRAConfig
from lqmod.nn.adapter import Adapter
from lqmod.nn.quantized_linear import QuantizedLinear

__all__ = ["IECAdapter", "check_rank", "fitting_ranks"]


def fitting_ranks(shape: tuple[int, int], limit: int = 64) -> list[int]:
    """Ranks up to ``limit`` that divide both dimensions of an (out, in) layer."""
    out_f, in_f = shape
    return [r for r in range(1, limit + 1) if in_f % r == 0 and out_f % r == 0]


def check_rank(shape: tuple[int, int], lora: LoRAConfig, config: Any = None) -> None:
    """Refuse a rank that does not divide the layer's in/out features, naming ranks that do."""
    out_f, in_f = shape
    bad = [f"{what}={n}" for what, n in (("in_features", in_f), ("out_features", out_f)) if n % lora.r]
    if bad:
        raise ValueError(
            f"iec adapter: rank r={lora.r} does not divide {' and '.join(bad)} of this ({out_f}, {in_f}) layer "
            f"(IEC averages in_features/r inputs per rank and repeats each rank out_features/r times); "
            f"ranks that fit: {fitting_ranks(shape)}"
        )


class IECAdapter(Adapter):
    """LoRA's ``A``, ``B`` plus the elastic scalars ``beta_A`` and ``beta_B`` (shape (1,) each)."""

    def __init__(
        self,
        lora: LoRAConfig,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        shape: tuple[int, int],
        beta_init: float = 0.0,
    ) -> None:
        check_rank(shape, lora)
        super().__init__(lora, lora_a, lora_b)
        self.out_features, self.in_features = shape
        self.beta_A = nn.Parameter(torch.full((1,), float(beta_init), dtype=lora_a.dtype, device=lora_a.device))
        self.beta_B = nn.Parameter(torch.full((1,), float(beta_init), dtype=lora_a.dtype, device=lora_a.device))

    def elastic_update(self, x: torch.Tensor) -> torch.Tensor:
        """``s * u`` of the module docstring, in the adapter's dtype."""
        xa = x.to(self.lora_A.dtype)
        group_mean = xa.reshape(*xa.shape[:-1], self.r, self.in_features // self.r).mean(dim=-1)
        h = torch.nn.functional.linear(self.dropout(xa), self.lora_A) + self.beta_A * group_mean
        u = torch.nn.functional.linear(h, self.lora_B) + self.beta_B * h.repeat_interleave(
            self.out_features // self.r, dim=-1
        )
        return u * self.scaling

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base: QuantizedLinear
    ) -> torch.Tensor:
        return base_out + self.elastic_update(x).to(base_out.dtype)

    def paths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``G`` (r, in) and ``R`` (out, r) as dense matrices (for merging and tests)."""
        a = self.lora_A
        eye = torch.eye(self.r, dtype=a.dtype, device=a.device)
        g = self.in_features // self.r
        mean = torch.kron(eye, torch.full((1, g), 1.0 / g, dtype=a.dtype, device=a.device))
        repeat = torch.kron(eye, torch.ones(self.out_features // self.r, 1, dtype=a.dtype, device=a.device))
        return mean, repeat

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        mean, repeat = self.paths()
        up = self.lora_B + self.beta_B * repeat
        down = self.lora_A + self.beta_A * mean
        return weight + ((up @ down) * self.scaling).to(weight.dtype)

    def extra_repr(self) -> str:
        groups = f"{self.in_features // self.r}->{self.out_features // self.r}"
        return f"r={self.r}, scaling={self.scaling:g}, groups={groups}"


def build(
    *, base: QuantizedLinear, lora: LoRAConfig, config: Any, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> IECAdapter:
    return IECAdapter(lora, lora_a, lora_b, (base.out_features, base.in_features), beta_init=config.beta_init)
