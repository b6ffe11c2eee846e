"""The Triton LutFormat kernels against float64, under the tolerance rule.

On CPU they run in triton's interpreter (small shapes: every program costs host time);
tests marked ``gpu`` repeat the check with compiled kernels where CUDA is present.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from lut_cases import LutCase, act_order, check_rule, int_zero_point, random_table, wrap

import lqmod
from lqmod.autograd import materialized_linear
from lqmod.config import LoRAConfig
from lqmod.kernels import select_backend
from lqmod.kernels.reference import REFERENCE, materialize_lut
from lqmod.kernels.triton.backend import Strategy, TritonLutBackend
from lqmod_nf.kernel_format import lut_format as nf_lut_format
from lqmod_nf.quantizer import NFConfig, quantize
from lqmod_nf.quantizer import materialize as nf_materialize

pytestmark = pytest.mark.triton


def _nf(bits: int, blocksize: int, double_quant: bool) -> Callable[[], LutCase]:
    def build() -> LutCase:
        weight = torch.randn(80, 192, generator=torch.Generator().manual_seed(bits))
        qweight = quantize(weight, NFConfig(bits=bits, blocksize=blocksize, double_quant=double_quant))
        case = LutCase(qweight, nf_lut_format)
        object.__setattr__(case, "materialize", nf_materialize)  # the plug-in's own path
        return case

    return build


# Shapes are off the kernels' block sizes (masks), group sizes both whole tiles (64) and
# not (32, 48, 25), 3 bits with rows starting mid-byte (100 columns).
CASES: dict[str, Callable[[], LutCase]] = {
    "nf4-dq": _nf(4, 64, True),
    "nf4": _nf(4, 64, False),
    "nf2-b32": _nf(2, 32, False),
    "nf3-dq": _nf(3, 64, True),
    "int4-zero-g48": lambda: wrap(int_zero_point((72, 192), 4, 48, seed=3)),
    "int4-act-order-g32": lambda: wrap(act_order((72, 192), 4, 32, seed=4)),
    "int3-zero-k100": lambda: wrap(int_zero_point((40, 100), 3, 25, seed=5)),
    "lut8-g64": lambda: wrap(random_table((40, 128), 8, 64, seed=6)),
}
DTYPES = [torch.float32, torch.bfloat16]


def _run(
    case: LutCase, backend: lqmod.kernels.KernelBackend, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = materialized_linear(x, case.qweight, case.materialize, backend)
    (grad_x,) = torch.autograd.grad(y, x, g)
    return y.detach(), grad_x


def _check_linear(name: str, case: LutCase, backend: TritonLutBackend, dtype: torch.dtype, device: str) -> None:
    out_f, in_f = case.qweight.shape
    gen = torch.Generator().manual_seed(0)
    # A 3-D, non-contiguous input: the backend flattens leading dims itself.
    x = torch.randn(3, in_f, 8, generator=gen).transpose(1, 2).to(device, dtype)
    g = torch.randn(3, 8, out_f, generator=gen).to(device, dtype)
    y, grad_x = _run(case, backend, x, g)
    y_ref, gx_ref = _run(case, REFERENCE, x, g)
    w64 = materialize_lut(case.fmt, torch.float64, exact=True)
    check_rule(name, "y", y, x.double() @ w64.t(), y_ref)
    check_rule(name, "grad_x", grad_x, g.double() @ w64, gx_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_fused_forward_backward(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]()
    backend = TritonLutBackend(case.lut_format, strategy="fused")
    _check_linear(f"fused {name} {str(dtype)[6:]}", case, backend, dtype, "cpu")


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["nf4-dq", "int4-act-order-g32", "int3-zero-k100"])
def test_tiled_forward_backward(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]()
    # A few KiB per block forces several row blocks, including a ragged last one.
    backend = TritonLutBackend(case.lut_format, strategy="tiled", tile_bytes=7 * 1024)
    _check_linear(f"tiled {name} {str(dtype)[6:]}", case, backend, dtype, "cpu")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_dequant_is_bit_exact(bits: int) -> None:
    from lqmod.kernels.triton.launch import lut_dequant

    fmt = act_order((40, 100), bits, 20, seed=bits) if bits % 2 else random_table((40, 100), bits, 20, seed=bits)
    assert torch.equal(lut_dequant(fmt, torch.float32), materialize_lut(fmt, torch.float32))
    assert torch.equal(lut_dequant(fmt, torch.float32, (13, 29)), materialize_lut(fmt, torch.float32, (13, 29)))
    assert torch.equal(lut_dequant(fmt, torch.bfloat16), materialize_lut(fmt, torch.bfloat16))


def test_bits_the_fused_kernel_does_not_declare_go_tiled() -> None:
    case = wrap(random_table((40, 64), 6, 32, seed=7))
    _check_linear("auto lut6 float32", case, TritonLutBackend(case.lut_format), torch.float32, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear_grads(nf_spec: lqmod.QuantizerSpec, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    qweight = quantize(torch.randn(80, 192, generator=gen), NFConfig())
    lora = LoRAConfig(r=4, alpha=8.0)
    a, b = torch.randn(4, 192, generator=gen) * 0.1, torch.randn(80, 4, generator=gen) * 0.1
    x = torch.randn(2, 9, 192, generator=gen).to(dtype)

    def grads(backend: lqmod.kernels.KernelBackend) -> list[torch.Tensor]:
        layer = lqmod.LoRALinear(qweight, nf_spec, lora, lora_a=a, lora_b=b)
        # On CPU "auto" picks the native kernel, so the test installs the backend the base
        # layer caches (LoRALinear asks its base layer for it).
        layer.base_layer._backend, layer.base_layer._backend_device = backend, x.device
        assert layer.backend(x.device) is backend
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        # A loss that is not linear in y, so the adapter gradients see the base output.
        (y.float() ** 2).sum().backward()
        out = [y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad]
        return [t for t in out if t is not None]

    assert nf_spec.lut_format is not None
    triton_backend = select_backend(qweight, x.device, lut_format=nf_spec.lut_format, backend="triton")
    assert isinstance(triton_backend, TritonLutBackend)
    got, same = grads(triton_backend), grads(REFERENCE)
    assert len(got) == len(same) == 4

    w64 = materialize_lut(nf_lut_format(qweight), torch.float64, exact=True)
    x64 = x.double().requires_grad_(True)
    a64, b64 = a.double().requires_grad_(True), b.double().requires_grad_(True)
    y64 = x64 @ w64.t() + lora.scaling * (x64 @ a64.t()) @ b64.t()
    (y64**2).sum().backward()
    assert x64.grad is not None and a64.grad is not None and b64.grad is not None
    refs = [y64, x64.grad, a64.grad, b64.grad]
    for what, g, s, r in zip(["y", "grad_x", "grad_A", "grad_B"], got, same, refs, strict=True):
        check_rule(f"LoRALinear nf4-dq {str(dtype)[6:]}", what, g, r.detach(), s)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_cuda(name: str, dtype: torch.dtype, strategy: Strategy) -> None:
    base = CASES[name]()
    case = LutCase(base.qweight.to("cuda"), base.lut_format)
    if name.startswith("nf"):
        object.__setattr__(case, "materialize", nf_materialize)
    backend = TritonLutBackend(case.lut_format, strategy=strategy)
    _check_linear(f"cuda {strategy} {name} {str(dtype)[6:]}", case, backend, dtype, "cuda")
