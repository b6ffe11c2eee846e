"""The QuIP#-like quantizer: incoherence processing, BlockLDLQ over E8P (+ a residual stage)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field

from lqmod.config import QuantizerConfig
from lqmod.packing import pack_codes, unpack_codes
from lqmod.quantize import QuantizationError
from lqmod.types import LayerStats, QuantizedWeight
from lqmod_quip.codebooks import DIM, e8_1bit_encode, e8_1bit_grid, e8p_encode, e8p_grid
from lqmod_quip.hadamard import KronTransform, transform
from lqmod_quip.ldlq import block_ldlq, damped

NAME = "quip"

# Scale of each stage relative to the RMS of the transformed weight, minimising the MSE of a
# unit Gaussian (what incoherence processing makes of a weight), measured on 3-4e4 samples:
# E8P alone is best at 0.96 (MSE 0.0916 per weight); its residual (RMS 0.303) is best
# quantized at 0.49 with the 1-bit E8 codebook (total MSE 0.0303) and at 0.295 with E8P
# again (total MSE 0.0100). Stored as ratios to the first stage's scale.
STAGE1_RATIO = 0.96
RESID_RATIO = {3: 0.49 / 0.96, 4: 0.295 / 0.96}
_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class QuipConfig(QuantizerConfig):
    """QuIP#-style 2/3/4-bit quantization: random Hadamard incoherence + BlockLDLQ on E8P.

    ``bits=2`` is E8P alone; 3 adds a 1-bit E8 residual stage, 4 a second E8P stage.
    """

    bits: Literal[2, 3, 4] = 2
    seed: int = Field(0, ge=0, lt=2**31, description="seed of the random sign vectors S_U, S_V")
    damp: float = Field(0.01, gt=0.0, le=10.0, description="Hessian damping, a fraction of mean(diag H)")
    scale_dtype: Literal["float16", "float32"] = "float32"


def _stage_count(bits: int) -> int:
    return 1 if bits == 2 else 2


def _check_shape(shape: tuple[int, int]) -> None:
    if shape[1] % DIM:
        raise QuantizationError(
            f"in_features={shape[1]} is not a multiple of {DIM}: E8P codes 8 consecutive input weights; "
            f"in_features that work are multiples of {DIM}"
        )


def bits_per_param(cfg: QuipConfig, shape: tuple[int, int]) -> float:
    _check_shape(shape)
    m, n = shape
    vectors = m * n // DIM
    code_bits = vectors * (16 + {2: 0, 3: 8, 4: 16}[cfg.bits])
    sign_bits = 8 * math.ceil((m + n) / 8)
    scale_bits = _stage_count(cfg.bits) * torch.finfo(_SCALE_DTYPES[cfg.scale_dtype]).bits
    return (code_bits + sign_bits + scale_bits) / (m * n)


def _random_signs(count: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (count,), generator=gen)


def _to_transformed(w: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, tm: KronTransform,
                    tn: KronTransform) -> torch.Tensor:  # fmt: skip
    """``(T_m D_u) W (T_n D_v)^T``."""
    x = tn.apply(w * sv.unsqueeze(0))
    return tm.apply((x * su.unsqueeze(1)).T).T


def _from_transformed(wt: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, tm: KronTransform,
                      tn: KronTransform) -> torch.Tensor:  # fmt: skip
    """Inverse of :func:`_to_transformed`: ``D_u T_m^T W~ T_n D_v``."""
    x = tm.inverse(wt.T).T * su.unsqueeze(1)
    return tn.inverse(x) * sv.unsqueeze(0)


def _hessian_transformed(h: torch.Tensor, sv: torch.Tensor, tn: KronTransform) -> torch.Tensor:
    """``(T_n D_v) H (T_n D_v)^T``: the Hessian of the transformed input ``x~ = T_n D_v x``."""
    a = h * sv.unsqueeze(0) * sv.unsqueeze(1)
    return tn.apply(tn.apply(a).T).T


def quantize(weight: torch.Tensor, cfg: QuipConfig, stats: LayerStats | None = None) -> QuantizedWeight:
    m, n = weight.shape
    _check_shape((m, n))
    if stats is None or stats.hessian is None:
        raise QuantizationError("quip needs stats.hessian (X^T X of the layer input); pass calibration data")
    if tuple(stats.hessian.shape) != (n, n):
        raise QuantizationError(
            f"stats.hessian has shape {tuple(stats.hessian.shape)}; a weight with in_features={n} needs ({n}, {n})"
        )
    if not bool(torch.isfinite(stats.hessian).all()):
        raise QuantizationError("stats.hessian has non-finite values; only a finite X^T X can be used")
    dev = weight.device
    gen = torch.Generator().manual_seed(cfg.seed)
    sign_bits = _random_signs(m + n, gen)
    signs = (1.0 - 2.0 * sign_bits.to(torch.float64)).to(dev)
    su, sv = signs[:m], signs[m:]
    tm, tn = _transforms(m, n, cfg.seed, dev)

    wt = _to_transformed(weight.to(torch.float64), su, sv, tm, tn)
    ht = damped(_hessian_transformed(stats.hessian.to(dev, torch.float64), sv, tn), cfg.damp)

    sdtype = _SCALE_DTYPES[cfg.scale_dtype]
    rms = float(wt.pow(2).mean().sqrt())
    # Quantize with the scales as stored, so materialize reproduces exactly what LDLQ saw.
    s1 = torch.tensor([rms * STAGE1_RATIO], dtype=torch.float64).to(sdtype)
    scales = s1 if cfg.bits == 2 else torch.cat([s1, (s1.double() * RESID_RATIO[cfg.bits]).to(sdtype)])
    sc = scales.double().tolist()
    # A zero scale (all-zero weight, or one below float16's range) stores exact zeros: the
    # codes are then irrelevant, so any finite divisor picks them.
    div = [v if v > 0 else 1.0 for v in sc]

    grid, grid1 = _grids(dev)
    blocks = n // DIM
    codes1 = torch.empty(m, blocks, dtype=torch.int64, device=dev)
    codes2 = torch.empty(m, blocks, dtype=torch.int64, device=dev)

    def round_block(x: torch.Tensor, k: int) -> torch.Tensor:
        c1 = e8p_encode(x / div[0])
        q = grid[c1] * sc[0]
        codes1[:, k] = c1
        if cfg.bits == 3:
            c2 = e8_1bit_encode((x - q) / div[1])
            q = q + grid1[c2] * sc[1]
            codes2[:, k] = c2
        elif cfg.bits == 4:
            c2 = e8p_encode((x - q) / div[1])
            q = q + grid[c2] * sc[1]
            codes2[:, k] = c2
        return q

    block_ldlq(wt, ht, DIM, round_block)

    tensors = {"signs": pack_codes(sign_bits.to(dev), 1), "scales": scales.to(dev)}
    if cfg.bits == 2:
        tensors["codes"] = codes1.unsqueeze(0).to(torch.int16)
    elif cfg.bits == 3:
        tensors["codes"] = codes1.unsqueeze(0).to(torch.int16)
        tensors["resid_codes"] = codes2.to(torch.uint8)
    else:
        tensors["codes"] = torch.stack([codes1, codes2]).to(torch.int16)
    return QuantizedWeight(NAME, cfg.model_dump(), (m, n), tensors, dtype=weight.dtype)


# materialize runs in every backward pass: keep the constant tables on the weights' device.
@lru_cache(maxsize=64)
def _transforms(m: int, n: int, seed: int, dev: torch.device) -> tuple[KronTransform, KronTransform]:
    def moved(t: KronTransform) -> KronTransform:
        return KronTransform(t.small.to(dev), t.walsh.to(dev), t.kind)

    return moved(transform(m, seed)), moved(transform(n, seed))


@lru_cache(maxsize=8)
def _grids_as(dev: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per dtype too: the E8P grid is 65536 x 8, a conversion per call would cost more
    # than the gather.
    grid, grid1 = _grids(dev)
    return grid.to(dtype), grid1.to(dtype)


@lru_cache(maxsize=8)
def _grids(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return e8p_grid().to(dev), e8_1bit_grid().to(dev)


def materialize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``D_u T_m^T W~ T_n D_v`` with ``W~`` decoded from the codebook(s).

    Works in float64 only for a float64 result, else in float32 (the codebooks' half-integers
    are exact there). The codebook gather writes straight into the one output-sized buffer,
    and the Hadamard factors run as fast Walsh-Hadamard transforms in place in it, so no
    per-call intermediate is larger than the output (the Paley/random factor's matmul, when
    the order has one, makes one output-sized copy).
    """
    m, n = qweight.shape
    bits = int(qweight.config["bits"])
    seed = int(qweight.config["seed"])
    t = qweight.tensors
    dev = t["codes"].device
    work = torch.float64 if dtype == torch.float64 else torch.float32
    sc = t["scales"].double().tolist()
    grid, grid1 = _grids_as(dev, work)
    codes = t["codes"]
    wt = torch.empty(m, n, dtype=work, device=dev)
    torch.index_select(grid, 0, codes[0].reshape(-1).int() & 0xFFFF, out=wt.view(-1, 8))
    wt.mul_(sc[0])
    if bits in (3, 4):
        second, table = (t["resid_codes"], grid1) if bits == 3 else (codes[1], grid)
        # Row chunks bound the second stage's temporary to a slice of the output: at most
        # 2^18 weights and an eighth of the rows (a fixed 2^18 was more than a small output).
        step = max(1, min(m // 8, (1 << 18) // n))
        flat = second.reshape(m, -1)
        for r0 in range(0, m, step):
            part = table[flat[r0 : r0 + step].reshape(-1).int() & 0xFFFF].mul_(sc[1])
            wt[r0 : r0 + step].add_(part.view(-1, n))
    sign_bits = unpack_codes(t["signs"], 1, m + n).to(work)
    signs = 1.0 - 2.0 * sign_bits
    tm, tn = _transforms(m, n, seed, dev)
    wt = tm.inverse_along(wt, 0)
    wt.mul_((signs[:m] * tm.walsh_norm).unsqueeze(1))
    wt = tn.inverse_along(wt, 1)
    wt.mul_((signs[m:] * tn.walsh_norm).unsqueeze(0))
    return wt if wt.dtype == dtype else wt.to(dtype)


def options() -> list[QuipConfig]:
    return [QuipConfig(bits=b) for b in (2, 3, 4)]
