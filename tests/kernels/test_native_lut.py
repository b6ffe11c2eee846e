"""The compiled CPU LUT kernel: bit for bit the torch reference, for every format and dtype."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lut_cases import act_order, int_zero_point, random_table, wrap

import lqmod
from lqmod.autograd import materialized_linear
from lqmod.kernels import native, select_backend
from lqmod.kernels.formats import LutFormat
from lqmod.kernels.reference import REFERENCE, materialize_lut
from lqmod.quantize import QuantizationError
from lqmod.types import LayerStats

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAKERS = {"random_table": random_table, "int_zero_point": int_zero_point, "act_order": act_order}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (-0.0 != 0.0): what "bit-exact" means.

    NaN only has to be NaN in both: torch itself casts a NaN to bfloat16 as 0xFFFF in its
    vectorised loop and as 0x7FC0 in its scalar one.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    bits_a, bits_b = a.contiguous().view(view), b.contiguous().view(view)
    return torch.equal(bits_a[~nan], bits_b[~nan])


# (shape, group): in % 8 == 0 with groups of 8k takes the vector path (AVX2 builds);
# the others (odd widths, groups of 6, rows not starting on a byte) the scalar one.
LAYOUTS = [((16, 64), 16), ((9, 48), 8), ((5, 24), 6), ((7, 30), 10), ((3, 13), 13)]


@pytest.mark.parametrize("maker", list(MAKERS))
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_kernel_equals_reference(maker: str, bits: int) -> None:
    for seed, (shape, group) in enumerate(LAYOUTS):
        fmt = MAKERS[maker](shape, bits, group, seed)
        for dtype in DTYPES:
            ref = materialize_lut(fmt, dtype)
            assert same_bits(native.lut_materialize(fmt, dtype), ref), (maker, bits, shape, group, dtype)
            rows = (1, shape[0] - 1)
            assert same_bits(native.lut_materialize(fmt, dtype, rows), materialize_lut(fmt, dtype, rows))


# Act-order with many groups: the kernel's other act-order paths (a per-row table of every
# (group, code) value where it is smaller than the row, the vector gathers, the scalar loop).
MANY_GROUPS = [((6, 512), 8), ((5, 1000), 20), ((3, 1001), 7), ((4, 4096), 32)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_act_order_with_many_groups_equals_reference(bits: int) -> None:
    for seed, (shape, group) in enumerate(MANY_GROUPS):
        fmt = act_order(shape, bits, group, seed)
        for dtype in DTYPES:
            assert same_bits(native.lut_materialize(fmt, dtype), materialize_lut(fmt, dtype)), (bits, shape, dtype)
        rows = (1, shape[0] - 1)
        assert same_bits(native.lut_materialize(fmt, torch.float32, rows), materialize_lut(fmt, torch.float32, rows))


# Act-order in blocks of eight rows (the gather-free path for bits <= 4): whole blocks and
# a remainder, row ranges starting off a block, few and many groups, with and without
# offsets, an arbitrary (non-integer) table, and rows whose codes cross bytes (3 bits).
BLOCK_CASES = [((8, 8), 8), ((16, 64), 16), ((19, 128), 4), ((24, 256), 8), ((33, 1024), 32), ((17, 4576), 32)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_act_order_blocks_of_eight_rows_equal_reference(bits: int) -> None:
    for seed, (shape, group) in enumerate(BLOCK_CASES):
        base = act_order(shape, bits, group, seed)
        gen = torch.Generator().manual_seed(100 + seed)
        table = torch.randn(2**bits, generator=gen)
        variants = {
            "offsets": base,
            "no offsets": LutFormat(shape, bits, base.codes, table, base.scales, group, None, base.g_idx),
        }
        for name, fmt in variants.items():
            for dtype in DTYPES:
                ref = materialize_lut(fmt, dtype)
                assert same_bits(native.lut_materialize(fmt, dtype), ref), (bits, shape, name, dtype)
            for rows in [(3, shape[0]), (1, min(shape[0], 9)), (shape[0] - 8, shape[0])]:
                got = native.lut_materialize(fmt, torch.float32, rows)
                assert same_bits(got, materialize_lut(fmt, torch.float32, rows)), (bits, shape, name, rows)


def test_rounding_edge_cases() -> None:
    # Ties, subnormals, overflow to inf, NaN and -0.0 in the table, through every output cast.
    special = [0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 2**-140, -(2**-20), 65520.0, float("nan"),
               1.0 + 2**-11, 3e38, -1.5, 2**-24, 0.1, -0.3, 7.0, 1e-3]  # fmt: skip
    table = torch.tensor(special, dtype=torch.float32)
    codes = torch.arange(16).repeat(4, 4)
    from lqmod.packing import pack_codes

    for scale in (1.0, 1.0 + 2**-10, 3.0):
        fmt = LutFormat((4, 64), 4, pack_codes(codes, 4), table, torch.full((4, 2), scale), 32)
        for dtype in DTYPES:
            assert same_bits(native.lut_materialize(fmt, dtype), materialize_lut(fmt, dtype)), (scale, dtype)


def lut_specs() -> list[lqmod.QuantizerSpec]:
    specs = [s for s in lqmod.get_registry().quantizers().values() if s.lut_format is not None]
    assert {"nf", "optq"} <= {s.name for s in specs}
    return specs


@pytest.mark.parametrize("spec", lut_specs(), ids=lambda s: s.name)
def test_every_lut_quantizer_matches_its_materialize(spec: lqmod.QuantizerSpec) -> None:
    """Through the backend, every option of every LUT quantizer gives its own materialize's bits.

    RTN with float32 scales is the one documented exception (its LutFormat agrees to float32
    rounding, see lqmod_example_rtn.kernel_format): there the kernel must still equal the
    LutFormat reference bit for bit.
    """
    assert spec.lut_format is not None and spec.options is not None
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 256, generator=gen) * 0.05
    x = torch.randn(512, 256, generator=gen, dtype=torch.float64)
    stats = LayerStats(hessian=x.t() @ x, n_tokens=512)  # for quantizers that need one
    seen = 0
    options = list(spec.options())
    # A spread of options (an OPTQ quantize is a Hessian solve of about a second here), and
    # act-order where the config has it, for the g_idx layout.
    options = options[:: max(1, len(options) // (4 if "hessian" in spec.needs else 12))]
    if "desc_act" in type(options[0]).model_fields:
        options.append(options[-1].model_copy(update={"desc_act": True}))
    for cfg in options:
        try:
            qweight = spec.quantize(weight, cfg, stats)
        except QuantizationError:  # an option this shape cannot take (priced out by bits_per_param)
            continue
        backend = select_backend(qweight, torch.device("cpu"), lut_format=spec.lut_format)
        assert backend.name == "native"
        fmt = spec.lut_format(qweight)
        if fmt is None:
            continue
        exact = not (spec.name == "rtn" and qweight.config.get("scale_dtype") == "float32")
        for dtype in DTYPES:
            got = backend.weight(qweight, spec.materialize, dtype)  # type: ignore[attr-defined]
            assert same_bits(got, materialize_lut(fmt, dtype)), (cfg, dtype)
            if exact:
                assert same_bits(got, spec.materialize(qweight, dtype)), (cfg, dtype)
        seen += 1
    assert seen >= 4


def test_layer_forward_backward_matches_reference() -> None:
    case = wrap(act_order((40, 64), 4, 16, seed=3))
    backend = select_backend(case.qweight, torch.device("cpu"), lut_format=case.lut_format)
    assert backend.name == "native"
    for dtype in DTYPES:
        outs = []
        for b in (backend, REFERENCE):
            x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
            y = materialized_linear(x, case.qweight, case.materialize, b)
            y.backward(torch.ones_like(y))
            assert x.grad is not None
            outs.append((y.detach(), x.grad))
        assert same_bits(outs[0][0], outs[1][0]) and same_bits(outs[0][1], outs[1][1]), dtype
    # float64 is outside the kernel's declared dtypes: the backend hands it to materialize.
    x64 = torch.randn(2, 64, dtype=torch.float64)
    ref = REFERENCE.linear(x64, case.qweight, case.materialize)
    assert torch.equal(backend.linear(x64, case.qweight, case.materialize), ref)


def test_bad_arguments_are_refused() -> None:
    fmt = act_order((4, 16), 4, 8, seed=0)
    with pytest.raises(ValueError, match="output dtype must be one of float32, bfloat16, float16"):
        native.lut_materialize(fmt, torch.float64)
    with pytest.raises(ValueError, match="rows \\(0, 5\\) out of range"):
        native.lut_materialize(fmt, rows=(0, 5))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        native.lut_materialize(fmt, out=torch.empty(4, 15))
    g_idx = torch.full((16,), 7, dtype=torch.int32)  # 7 of 2 groups
    bad = LutFormat(fmt.shape, 4, fmt.codes, fmt.table, fmt.scales, 8, fmt.zeros, g_idx)
    with pytest.raises(ValueError, match="refused its arguments \\(code -3\\)"):
        native.lut_materialize(bad)


def _probe(env: dict[str, str]) -> str:
    code = (
        "import torch; from lqmod.kernels import native, select_backend;"
        "import sys; sys.path.insert(0, 'tests/kernels'); from lut_cases import random_table, wrap;"
        "c = wrap(random_table((8, 16), 4, 8, 0));"
        "b = select_backend(c.qweight, torch.device('cpu'), lut_format=c.lut_format);"
        "print(b.name, '|', native.unavailable_reason())"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, cwd=root, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.slow
def test_falls_back_without_a_compiler(tmp_path: Path) -> None:
    out = _probe({"LQMOD_CACHE_DIR": str(tmp_path), "CC": str(tmp_path / "no-such-cc")})
    assert out.startswith("torch | building lut_cpu.c failed"), out
    assert _probe({"LQMOD_NATIVE": "0"}) == "torch | disabled by LQMOD_NATIVE=0"
