"""Baselines, each from its own package, behind one interface.

Every baseline maps a dense ``(out, in)`` weight (and, for GPTQ, the calibration Gram
``X^T X``) to :class:`Quantized`: the dequantized weight and the bits its package stores, so
the metrics apply identically to every row. Packages are imported in :meth:`prepare`, which
raises :class:`Unavailable` with the reason (not installed, unsupported here) so the row is
reported rather than dropped. Constant code tables (the 16 NF4 values, the 256-entry dynamic
map) are not counted as storage, for lqmod rows neither.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "BASELINES",
    "BaselineError",
    "BnbFP4",
    "BnbNF4",
    "GPTQ",
    "HQQ",
    "LoftQ",
    "Quantized",
    "TorchaoNF4",
    "Unavailable",
    "make_baseline",
]


class Unavailable(RuntimeError):
    """The baseline cannot run in this environment; ``str()`` says why."""


class BaselineError(ValueError):
    """A baseline spec names an unknown baseline or field."""


@dataclass(frozen=True)
class Quantized:
    weight: torch.Tensor  # dequantized (out, in), float32
    storage_bits: int
    note: str = ""


def _bits(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


def _version(dist: str) -> str:
    try:
        return f"{dist} {md.version(dist)}"
    except md.PackageNotFoundError:
        return dist


def _require(module: str, dist: str, hint: str = "") -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise Unavailable(f"{dist} not installed ({exc.__class__.__name__}: {exc}){hint}") from None


@dataclass(frozen=True)
class _Baseline:
    name: ClassVar[str]
    dist: ClassVar[str]
    needs_hessian: ClassVar[bool] = False

    @property
    def source(self) -> str:
        return _version(self.dist)

    def prepare(self) -> None:
        """Import the package (raise :class:`Unavailable` if it cannot run here)."""

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        raise NotImplementedError


@dataclass(frozen=True)
class BnbNF4(_Baseline):
    """bitsandbytes ``quantize_4bit``/``dequantize_4bit`` (CPU works since 0.45)."""

    name: ClassVar[str] = "bnb-nf4"
    dist: ClassVar[str] = "bitsandbytes"
    blocksize: int = 64
    double_quant: bool = False
    quant_type: ClassVar[str] = "nf4"

    def prepare(self) -> None:
        _require("bitsandbytes.functional", "bitsandbytes")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(
            weight.float().contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
        )
        deq = bnbf.dequantize_4bit(q, state).float()
        bits = _bits(q, state.absmax)
        if state.nested:  # 8-bit absmax codes + their float32 scales + the mean offset
            bits += _bits(state.state2.absmax, state.offset.reshape(1))
        return Quantized(deq, bits)


@dataclass(frozen=True)
class BnbFP4(BnbNF4):
    name: ClassVar[str] = "bnb-fp4"
    quant_type: ClassVar[str] = "fp4"


def _torchao_to_nf4() -> Any:
    # NF4Tensor moved in torchao 0.1x; try the new home first, then the old one.
    for path in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(path).to_nf4
        except (ImportError, AttributeError):
            continue
    raise Unavailable("torchao not installed, or it has no NF4Tensor (to_nf4)")


@dataclass(frozen=True)
class TorchaoNF4(_Baseline):
    """torchao's NF4Tensor (QLoRA NF4 with 8-bit linear double quantization of the scales)."""

    name: ClassVar[str] = "torchao-nf4"
    dist: ClassVar[str] = "torchao"
    blocksize: int = 64
    scaler_blocksize: int = 256

    def prepare(self) -> None:
        _torchao_to_nf4()

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        to_nf4 = _torchao_to_nf4()
        n_blocks = weight.numel() // self.blocksize
        sb, note = self.scaler_blocksize, ""
        # torchao needs the number of blocks to be a multiple of the scaler block; halve it
        # where it is not (e.g. SmolLM2's 192x576 k/v projections), and say so.
        while n_blocks % sb and sb > 1:
            sb //= 2
        if sb != self.scaler_blocksize:
            note = f"scaler_blocksize {sb} where {self.scaler_blocksize} does not divide the blocks"
        t = to_nf4(weight.float().contiguous(), self.blocksize, sb)
        bits = _bits(t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean.reshape(1))
        return Quantized(t.get_original_weight().float(), bits, note)


@dataclass(frozen=True)
class HQQ(_Baseline):
    """Half-Quadratic Quantization (hqq's ``Quantizer``), affine per group, zero and scale
    optimised by its proximal solver; scale and zero kept in float16 as HQQ stores them."""

    name: ClassVar[str] = "hqq"
    dist: ClassVar[str] = "hqq"
    bits: int = 4
    group_size: int = 64

    def prepare(self) -> None:
        _require("hqq.core.quantize", "hqq")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        from hqq.core.quantize import Quantizer

        w_q, meta = Quantizer.quantize(
            weight.float().contiguous(),
            nbits=self.bits,
            channel_wise=True,
            group_size=self.group_size,
            optimize=True,
            round_zero=False,
            axis=1,
            bitpack=True,
            compute_dtype=torch.float32,
            device="cpu" if weight.device.type == "cpu" else str(weight.device),
        )
        # On CPU HQQ returns float32 scale/zero; its GPU path keeps them in the fp16 compute
        # dtype. Round them to fp16 so the error matches the 16 bits counted.
        meta = dict(meta, scale=meta["scale"].half().float(), zero=meta["zero"].half().float())
        deq = Quantizer.dequantize(w_q, meta).float().reshape(weight.shape)
        return Quantized(deq, _bits(w_q) + 16 * (meta["scale"].numel() + meta["zero"].numel()))


@dataclass(frozen=True)
class LoftQ(_Baseline):
    """PEFT's LoftQ initialisation: NF4 base Q plus a rank-r SVD correction B A of W - Q.

    ``peft.utils.loftq_utils.loftq_init`` hard-codes a CUDA/XPU compute device; without one
    the same loop runs on CPU with PEFT's own ``_low_rank_decomposition`` and the same
    bitsandbytes NF4 call (``Params4bit``: blocksize 64, no double quantization). The stored
    bits include the adapters at 16 bits, since the error measured includes them.
    """

    name: ClassVar[str] = "loftq"
    dist: ClassVar[str] = "peft"
    bits: int = 4
    rank: int = 16
    iters: int = 1

    def prepare(self) -> None:
        _require("peft.utils.loftq_utils", "peft")
        _require("bitsandbytes.functional", "bitsandbytes")
        if self.bits != 4:
            raise Unavailable(f"PEFT LoftQ supports NF4 (bits=4) and int8 only, not bits={self.bits}")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        import bitsandbytes.functional as bnbf
        from peft.utils import loftq_utils

        w = weight.float()
        if torch.cuda.is_available():
            deq, lora_a, lora_b = loftq_utils.loftq_init(w, num_bits=4, reduced_rank=self.rank, num_iter=self.iters)
            deq, lora_a, lora_b = deq.float().cpu(), lora_a.float().cpu(), lora_b.float().cpu()
            note = "peft.loftq_init"
        else:
            res = w.clone()
            for i in range(self.iters):
                q, state = bnbf.quantize_4bit(res.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4")
                deq = bnbf.dequantize_4bit(q, state).float()
                out = loftq_utils._low_rank_decomposition(w - deq, reduced_rank=self.rank)
                lora_b, lora_a = out["L"], out["R"]
                if i + 1 < self.iters:
                    res = w - lora_b @ lora_a
            note = "peft loftq_init needs CUDA: same loop on CPU (peft SVD + bnb NF4)"
        bits = 4 * w.numel() + 32 * -(-w.numel() // 64) + 16 * self.rank * sum(w.shape)
        return Quantized(deq + lora_b @ lora_a, bits, note)


@dataclass(frozen=True)
class GPTQ(_Baseline):
    """GPTQ from GPTQModel (optional extra ``lqmod[gptq]``), layer by layer on the Gram.

    GPTQModel's ``GPTQ`` accumulates ``H`` from inputs; it is fed rows ``S`` with
    ``S^T S = X^T X`` (from an eigendecomposition), which gives the same ``H``. Storage
    counts the GPTQ checkpoint format: packed codes, fp16 scales, packed zero points, g_idx.
    """

    name: ClassVar[str] = "gptq"
    dist: ClassVar[str] = "gptqmodel"
    needs_hessian: ClassVar[bool] = True
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    damp: float = 0.01

    def prepare(self) -> None:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        _require("gptqmodel", "gptqmodel", "; pip install 'lqmod[gptq]' (gptqmodel==7.6.0)")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ as _GPTQ

        if hessian is None:
            raise ValueError("GPTQ needs the calibration Gram matrix")
        out_f, in_f = weight.shape
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = weight.float().clone()
        cfg = QuantizeConfig(bits=self.bits, group_size=self.group_size, desc_act=False, sym=self.sym, offload_to_disk=False)
        g = _GPTQ(lin, cfg)
        g.quantizer.configure(perchannel=True)
        evals, evecs = torch.linalg.eigh(hessian.double())
        g.add_batch((evecs * evals.clamp(min=0).sqrt()).T.float().unsqueeze(0), None)
        g.hf_quantize(group_size=self.group_size, actorder=False, percdamp=self.damp)
        groups = -(-in_f // self.group_size) if self.group_size > 0 else 1
        bits = self.bits * weight.numel() + groups * out_f * (16 + self.bits) + 32 * in_f
        return Quantized(lin.weight.data.float().clone(), bits)


BASELINES: dict[str, type[_Baseline]] = {
    cls.name: cls for cls in (BnbNF4, BnbFP4, TorchaoNF4, HQQ, LoftQ, GPTQ)
}


def make_baseline(name: str, config: dict[str, Any]) -> _Baseline:
    """The baseline ``name`` with ``config``; unknown names or fields list what is accepted."""
    if name not in BASELINES:
        raise BaselineError(f"unknown baseline {name!r}. Choose one of: {', '.join(BASELINES)}")
    cls = BASELINES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise BaselineError(f"baseline {name!r} has no field(s) {unknown}; fields: {', '.join(fields) or '(none)'}")
    return cls(**config)
