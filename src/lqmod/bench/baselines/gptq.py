"""GPTQ from GPTQModel (optional extra ``lqmod[gptq]``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from lqmod.bench.baselines.base import Baseline, Quantized, require


@dataclass(frozen=True)
class GPTQ(Baseline):
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
        require("gptqmodel", "gptqmodel", "; pip install 'lqmod[gptq]' (gptqmodel==7.6.0)")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ as _GPTQ

        if hessian is None:
            raise ValueError("GPTQ needs the calibration Gram matrix")
        out_f, in_f = weight.shape
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = weight.float().clone()
        cfg = QuantizeConfig(
            bits=self.bits,
            group_size=self.group_size,
            desc_act=False,
            sym=self.sym,
            offload_to_disk=False,
            # 7.x turns on its activation-group-aware reordering by default; plain GPTQ is the
            # algorithm every other GPTQ row (lqmod's optq, the papers) means.
            act_group_aware=False,
        )
        g = _GPTQ(lin, cfg)
        g.quantizer.configure(perchannel=True)
        evals, evecs = torch.linalg.eigh(hessian.double())
        g.add_batch((evecs * evals.clamp(min=0).sqrt()).T.float().unsqueeze(0), None)
        g.hf_quantize(group_size=self.group_size, actorder=False, percdamp=self.damp, act_group_aware=False)
        groups = -(-in_f // self.group_size) if self.group_size > 0 else 1
        bits = self.bits * weight.numel() + groups * out_f * (16 + self.bits) + 32 * in_f
        return Quantized(lin.weight.data.float().clone(), bits)
