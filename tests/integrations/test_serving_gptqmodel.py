"""The serving export loaded by GPTQModel 7.6 (and PEFT over GPTQModel's layers), on the CPU.

Runs in the second pass of ``scripts/test.sh`` (GPTQModel on PYTHONPATH); skipped when
gptqmodel does not import. PEFT puts its LoRA on GPTQModel's layers only when ``optimum``
>= 1.24 is importable too (``scripts/setup-gptqmodel.sh`` installs it beside GPTQModel);
without it those checks skip.

Tolerances: GPTQModel computes in float16 (``TorchLinear``) or bfloat16 (``TorchFusedLinear``,
its CPU default for 4 bits), lqmod's reference in float32. The rule is the kernels' one: the
difference to the float32 reference may be at most twice what lqmod's own model, cast to the
same dtype, differs from it (plus 1e-3 of the largest logit for the summation order). The
weights themselves are compared exactly in ``tests/plugins/optq/test_optq_gptqmodel_interop.py``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from serving_helpers import lqmod_logits, lqmod_native, peft_over_lqmod, tiny_tokenizer

from lqmod.integrations.serving import export_gptq_peft

pytestmark = [pytest.mark.slow, pytest.mark.gptqmodel]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
try:
    from gptqmodel import BACKEND, GPTQModel
except Exception as exc:  # gptqmodel is optional; any import failure means "not available here"
    pytest.skip(f"gptqmodel is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)
peft = pytest.importorskip("peft")
torch.set_num_threads(1)


def _peft_takes_gptqmodel() -> bool:
    from peft.import_utils import is_gptqmodel_available

    try:
        return bool(is_gptqmodel_available())
    except ImportError:  # PEFT's own check: gptqmodel needs optimum >= 1.24
        return False


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


def _bound(model: Any, ids: torch.Tensor, dtype: torch.dtype, reference: torch.Tensor, adapters: bool) -> float:
    """Twice lqmod's own error in ``dtype`` against its float32 logits, plus 1e-3 of their range."""
    cast = copy.deepcopy(model).to(dtype)
    own = (lqmod_logits(cast, ids, adapters=adapters) - reference).abs().max().item()
    return 2 * own + 1e-3 * reference.abs().max().item()


def _check(
    model: Any, out: Path, ids: torch.Tensor, backend: Any, dtype: torch.dtype, kernel: str, compute: torch.dtype
) -> None:
    base_ref, ft_ref = lqmod_logits(model, ids, adapters=False), lqmod_logits(model, ids)
    gm = GPTQModel.load(str(out / "base"), device="cpu", backend=backend, dtype=dtype)
    assert kernel in {type(m).__name__ for m in gm.model.modules()}
    with torch.no_grad():
        got = gm.model(input_ids=ids).logits.float()
    err, bound = (got - base_ref).abs().max().item(), _bound(model, ids, compute, base_ref, adapters=False)
    assert err <= bound, (err, bound)
    if not _peft_takes_gptqmodel():
        pytest.skip("PEFT refuses GPTQModel layers without optimum >= 1.24 (scripts/setup-gptqmodel.sh installs it)")
    served = peft.PeftModel.from_pretrained(gm.model, str(out / "adapter"))
    assert "GPTQLoraLinear" in {type(m).__name__ for m in served.modules()}
    with torch.no_grad():
        got = served(input_ids=ids).logits.float()
    err, bound = (got - ft_ref).abs().max().item(), _bound(model, ids, compute, ft_ref, adapters=True)
    assert err <= bound, (err, bound)
    assert err < 0.1 * (ft_ref - base_ref).abs().max().item()  # the adapter is applied, not lost


def test_gptqmodel_serves_lqmod_native_export(tmp_path: Path, ids: torch.Tensor) -> None:
    # Mixed: a 3-bit act-order asymmetric layer (a "dynamic" override) and a dense layer ("-:").
    model = lqmod_native(mixed=True)
    export_gptq_peft(model, tmp_path / "serve", tokenizer=tiny_tokenizer())
    _check(model, tmp_path / "serve", ids, BACKEND.GPTQ_TORCH, torch.float16, "TorchLinear", torch.float16)


def test_gptqmodel_own_adapter_loader_needs_folded_scaling(tmp_path: Path, ids: torch.Tensor) -> None:
    # GPTQModel's adapter=Lora(...) (its EoRA path, no PEFT) adds B A x without alpha / r:
    # right for the default (folded) export, wrong by the factor alpha / r = 2 when unfolded.
    from gptqmodel.adapter.adapter import Lora

    model = lqmod_native(mixed=False)
    base_ref, ft_ref = lqmod_logits(model, ids, adapters=False), lqmod_logits(model, ids)
    bound = _bound(model, ids, torch.float16, ft_ref, adapters=True)
    for fold in (True, False):
        out = tmp_path / f"fold-{fold}"
        export_gptq_peft(model, out, tokenizer=tiny_tokenizer(), fold_scaling=fold)
        gm = GPTQModel.load(
            str(out / "base"), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16,
            adapter=Lora(path=str(out / "adapter"), rank=4),
        )  # fmt: skip
        with torch.no_grad():
            err = (gm.model(input_ids=ids).logits.float() - ft_ref).abs().max().item()
        if fold:
            assert err <= bound, (err, bound)
        else:
            assert err > 0.2 * (ft_ref - base_ref).abs().max().item()


def test_gptqmodel_serves_peft_over_lqmod_config_export(tmp_path: Path, ids: torch.Tensor) -> None:
    # Uniform 4-bit symmetric: GPTQModel's automatic CPU kernel (bfloat16 compute).
    if not _peft_takes_gptqmodel():  # then PEFT's get_peft_model itself fails while gptqmodel imports
        pytest.skip("PEFT does not run beside GPTQModel without optimum >= 1.24 (setup-gptqmodel.sh installs it)")
    model = peft_over_lqmod(tmp_path, mixed=False)
    export_gptq_peft(model, tmp_path / "serve", tokenizer=tiny_tokenizer())
    _check(model, tmp_path / "serve", ids, BACKEND.AUTO, torch.float32, "TorchFusedLinear", torch.bfloat16)
