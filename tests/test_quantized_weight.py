"""QuantizedWeight: storage accounting, headers, and bit-exact safetensors round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lqmod
from lqmod.packing import pack_codes
from lqmod.types import QuantizedWeight


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


@pytest.fixture
def handmade() -> QuantizedWeight:
    """A (4, 8) weight: 4-bit codes, float16 scales, a bfloat16 offset, a scalar float32."""
    gen = torch.Generator().manual_seed(0)
    return QuantizedWeight(
        quantizer="handmade",
        config={"bits": 4, "version": 1, "groups": [8]},
        shape=(4, 8),
        tensors={
            "codes": pack_codes(torch.randint(0, 16, (32,), generator=gen), 4),
            "scales": torch.randn(4, 1, generator=gen).half(),
            "offset": torch.tensor([float("nan"), -0.0, 1e-40, 3.5]).bfloat16(),
            "t": torch.tensor(2.5),
        },
        meta={"note": "hand made", "calibrated_on": None},
        dtype=torch.bfloat16,
    )


def test_storage_accounting(handmade: QuantizedWeight) -> None:
    # codes 16 bytes, scales 4 x 2, offset 4 x 2, t 4 bytes; meta is not counted.
    assert handmade.numel == 32
    assert handmade.storage_bits() == (16 + 8 + 8 + 4) * 8
    assert handmade.bits_per_param() == (16 + 8 + 8 + 4) * 8 / 32


def test_storage_accounting_of_a_real_quantizer() -> None:
    nf = lqmod.get_registry().quantizer("nf")
    qw = lqmod.quantize_weight(nf, torch.randn(64, 128), {"bits": 4, "blocksize": 64, "double_quant": False})
    # 4-bit codes + one float32 absmax per 64 weights.
    assert qw.bits_per_param() == 4 + 32 / 64


def test_header_is_json_and_round_trips(handmade: QuantizedWeight) -> None:
    header = handmade.header()
    assert header == {
        "quantizer": "handmade",
        "config": {"bits": 4, "version": 1, "groups": [8]},
        "shape": [4, 8],
        "meta": {"note": "hand made", "calibrated_on": None},
        "dtype": "bfloat16",
        "tensors": ["codes", "offset", "scales", "t"],
    }
    rebuilt = QuantizedWeight.from_header(json.loads(json.dumps(header)), handmade.tensors)
    assert rebuilt == handmade  # dataclass equality on the same tensor objects
    assert rebuilt.shape == (4, 8)
    assert isinstance(rebuilt.shape, tuple)


def test_from_header_ignores_extra_tensors(handmade: QuantizedWeight) -> None:
    tensors = {**handmade.tensors, "unrelated": torch.zeros(3)}
    assert set(QuantizedWeight.from_header(handmade.header(), tensors).tensors) == set(handmade.tensors)


def test_safetensors_file_round_trip_is_bit_exact(handmade: QuantizedWeight, tmp_path: Path) -> None:
    tensors, metadata = handmade.to_safetensors()
    assert set(metadata) == {"lqmod.qweight"}
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with safetensors.safe_open(str(path), framework="pt") as f:
        loaded_meta = f.metadata()
    loaded = QuantizedWeight.from_safetensors(safetensors.torch.load_file(str(path)), loaded_meta)
    assert loaded.header() == handmade.header() | {"config": {"bits": 4, "version": 1, "groups": [8]}}
    assert loaded.dtype == torch.bfloat16
    for name, t in handmade.tensors.items():
        # NaN, -0.0 and a bfloat16 subnormal survive bit for bit.
        assert bitwise_equal(loaded.tensors[name], t), name


def test_safetensors_bytes_round_trip_of_a_real_weight() -> None:
    nf = lqmod.get_registry().quantizer("nf")
    weight = torch.randn(32, 128, dtype=torch.bfloat16)
    qw = lqmod.quantize_weight(nf, weight, {"bits": 3, "double_quant": True})
    tensors, metadata = qw.to_safetensors()
    blob = safetensors.torch.save(tensors, metadata=metadata)
    loaded = QuantizedWeight.from_safetensors(safetensors.torch.load(blob), metadata)
    assert loaded.config == qw.config
    assert loaded.dtype == torch.bfloat16
    assert bitwise_equal(nf.materialize(loaded, torch.bfloat16), nf.materialize(qw, torch.bfloat16))


def test_to_safetensors_makes_strided_tensors_contiguous() -> None:
    scales = torch.randn(2, 4).t()  # a transposed view: safetensors refuses non-contiguous input
    qw = QuantizedWeight("q", {}, (4, 2), {"scales": scales})
    tensors, metadata = qw.to_safetensors()
    assert tensors["scales"].is_contiguous()
    blob = safetensors.torch.save(tensors, metadata)
    loaded = QuantizedWeight.from_safetensors(safetensors.torch.load(blob), metadata)
    assert torch.equal(loaded.tensors["scales"], scales)


def test_to_copies_the_containers(handmade: QuantizedWeight) -> None:
    moved = handmade.to("cpu")
    moved.meta["note"] = "changed"
    moved.config["bits"] = 2
    moved.tensors["extra"] = torch.zeros(1)
    assert handmade.meta["note"] == "hand made"
    assert handmade.config["bits"] == 4
    assert "extra" not in handmade.tensors
    assert moved.device == torch.device("cpu")


def test_from_header_names_missing_tensors(handmade: QuantizedWeight) -> None:
    tensors = {k: v for k, v in handmade.tensors.items() if k not in ("scales", "t")}
    with pytest.raises(ValueError, match=r"quantized weight \(handmade\) lacks tensors \['scales', 't'\]"):
        QuantizedWeight.from_header(handmade.header(), tensors)


@pytest.mark.parametrize("dtype", ["float99", "Tensor", "nn"])
def test_from_header_refuses_unknown_dtypes(handmade: QuantizedWeight, dtype: str) -> None:
    with pytest.raises(ValueError, match=f"unknown dtype '{dtype}'"):
        QuantizedWeight.from_header(handmade.header() | {"dtype": dtype}, handmade.tensors)


@pytest.mark.parametrize("shape", [[32], [2, 4, 4], []])
def test_from_header_refuses_shapes_that_are_not_2d(handmade: QuantizedWeight, shape: list[int]) -> None:
    with pytest.raises(ValueError, match="must be 2-D"):
        QuantizedWeight.from_header(handmade.header() | {"shape": shape}, handmade.tensors)


def test_from_safetensors_needs_the_header(handmade: QuantizedWeight) -> None:
    tensors, _ = handmade.to_safetensors()
    with pytest.raises(ValueError, match=r"no 'lqmod\.qweight' metadata"):
        QuantizedWeight.from_safetensors(tensors, {"format": "pt"})
