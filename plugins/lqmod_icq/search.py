"""The per-block shift search of ICQ: maximise the entropy of each block's codes.

For a block ``w`` (one LUT group of the base: consecutive weights of a row) the candidates are
``tau = median(w) + f * absmax(w - median(w))`` for ``f`` on ``2 * tau_n + 1`` evenly spaced
points of ``[-tau_range * sigma, +tau_range * sigma]`` (IR-QLoRA's grid; ``sigma = 1 /
Phi^{-1}(0.9677083)``, the inverse of NF4's largest normal quantile), plus ``tau = 0`` (the
plain base). Every candidate is first rounded to its stored 8-bit value ``tau_q``, and the
block is quantized as ``base(w - tau_q)``: the entropy compared is that of the codes actually
stored, and ``materialize = base dequant + tau_q`` reconstructs exactly what was searched.

A block keeps a candidate only if it *strictly* raises the block's code entropy over the best
so far, starting from the plain base and visiting the candidates closest to the median first.
So a block whose stored shift is non-zero has strictly more code entropy than the plain base,
and a block whose shift is zero has the plain base's codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch

from lqmod.code_stats import block_entropy, lut_block_codes
from lqmod.quantize import QuantizationError
from lqmod.types import QuantizedWeight, QuantizerSpec

__all__ = ["SIGMA", "TAU_LEVELS", "SearchResult", "block_codes", "block_entropy", "search_shifts", "shift_values"]

SIGMA = 1.0 / NormalDist().inv_cdf(0.9677083)
#: Shifts are stored as int8 codes in [-TAU_LEVELS, TAU_LEVELS] times a per-group scale (0 exact).
TAU_LEVELS = 127


@dataclass
class SearchResult:
    qweight: QuantizedWeight  # the base weight of W - tau_q
    tau_codes: torch.Tensor  # int8 (n_blocks,)
    tau_scale: torch.Tensor  # float32 (n_tau_groups,)
    entropy: torch.Tensor  # float64 (n_blocks,), bits, of the stored codes
    plain_entropy: torch.Tensor  # float64 (n_blocks,), bits, of the plain base's codes


def block_codes(spec: QuantizerSpec, qweight: QuantizedWeight) -> tuple[torch.Tensor, int]:
    """The codes of a LUT-style weight as (n_blocks, group) int64, one row per LUT group, and bits."""
    if spec.lut_format is None:
        raise QuantizationError(f"base quantizer {spec.name!r} declares no lut_format")
    fmt = spec.lut_format(qweight)
    if fmt is None or fmt.g_idx is not None:
        why = "has no LutFormat" if fmt is None else "uses act-order groups (g_idx)"
        raise QuantizationError(
            f"icq needs blocks of consecutive weights: base {spec.name!r} with config {qweight.config} {why}"
        )
    return lut_block_codes(fmt), fmt.bits


def shift_values(tau_codes: torch.Tensor, tau_scale: torch.Tensor, tau_groupsize: int) -> torch.Tensor:
    """The float32 shift of every block: ``code * scale`` of its group (what materialize adds)."""
    scale = tau_scale.repeat_interleave(tau_groupsize)[: tau_codes.numel()]
    return tau_codes.float() * scale


def _candidate_factors(tau_range: float, tau_n: int) -> list[float]:
    grid = torch.linspace(-tau_range * SIGMA, tau_range * SIGMA, 2 * tau_n + 1, dtype=torch.float64).tolist()
    # Nearest to the median first (f = 0, then -d, +d, -2d, ...): a strict improvement is
    # needed to move away, so ties keep the shift closest to the median.
    return sorted(grid, key=lambda f: (abs(f), f))


def search_shifts(
    weight: torch.Tensor,
    quantize_base: Callable[[torch.Tensor], QuantizedWeight],
    spec: QuantizerSpec,
    group_size: int,
    *,
    tau_range: float,
    tau_n: int,
    tau_groupsize: int,
    progress: Callable[[int], None] | None = None,
) -> SearchResult:
    """Search every block's shift; ``quantize_base`` quantizes a dense (out, in) matrix with the base."""
    out_f, in_f = weight.shape
    w = weight.float()
    blocks = w.reshape(-1, group_size)
    n_blocks = blocks.shape[0]
    plain = quantize_base(w)
    codes, bits = block_codes(spec, plain)
    if codes.shape != blocks.shape:
        raise QuantizationError(f"base {spec.name!r} groups {tuple(codes.shape)} do not match {tuple(blocks.shape)}")
    plain_entropy = block_entropy(codes, bits)

    median = blocks.median(dim=1).values
    spread = (blocks - median.unsqueeze(1)).abs().amax(dim=1)
    reach = tau_range * SIGMA
    # Every candidate lies within |median| + reach * spread, so each group's scale is set once,
    # before the search, and every candidate is rounded onto the grid it will be stored on.
    bound = median.abs() + reach * spread
    n_groups = math.ceil(n_blocks / tau_groupsize)
    padded = torch.zeros(n_groups * tau_groupsize, dtype=torch.float32, device=w.device)
    padded[:n_blocks] = bound
    tau_scale = (padded.view(n_groups, tau_groupsize).amax(dim=1) / TAU_LEVELS).float().contiguous()
    scale = tau_scale.repeat_interleave(tau_groupsize)[:n_blocks]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))

    best_entropy = plain_entropy.clone()
    best_codes = torch.zeros(n_blocks, dtype=torch.int8, device=w.device)
    for f in _candidate_factors(tau_range, tau_n):
        tau = median + f * spread
        code = torch.where(scale > 0, torch.round(tau / safe), torch.zeros_like(tau)).clamp(-TAU_LEVELS, TAU_LEVELS)
        code8 = code.to(torch.int8)
        shifted = (blocks - (code8.float() * scale).unsqueeze(1)).view(out_f, in_f)
        cand_codes, _ = block_codes(spec, quantize_base(shifted))
        ent = block_entropy(cand_codes, bits)
        better = ent > best_entropy
        best_entropy = torch.where(better, ent, best_entropy)
        best_codes = torch.where(better, code8, best_codes)
        if progress is not None:
            progress(1)

    tau_q = shift_values(best_codes, tau_scale, tau_groupsize)
    final = quantize_base((blocks - tau_q.unsqueeze(1)).view(out_f, in_f))
    final_codes, _ = block_codes(spec, final)
    entropy = block_entropy(final_codes, bits)
    if not torch.equal(entropy, best_entropy):
        # Only a base whose block codes depend on other blocks can get here.
        raise QuantizationError(
            f"base {spec.name!r} did not quantize blocks independently (a block's codes changed when other blocks "
            "were shifted); icq needs a block-wise base such as 'nf' or 'rtn'"
        )
    return SearchResult(final, best_codes.contiguous(), tau_scale, entropy, plain_entropy)
