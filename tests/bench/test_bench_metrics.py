"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lqmod.bench.metrics import (
    aggregate_layers,
    bits_per_param,
    cosine_rows,
    gram,
    output_rel_error,
    output_rel_error_gram,
    perplexity_from_nll,
    weight_rel_error,
)


def test_bits_per_param() -> None:
    assert bits_per_param(4608, 1024) == 4.5
    with pytest.raises(ValueError, match="numel"):
        bits_per_param(8, 0)


def test_weight_rel_error_by_hand() -> None:
    w = torch.tensor([[3.0, 4.0]])
    assert weight_rel_error(w, torch.tensor([[3.0, 0.0]])) == pytest.approx(4 / 5)
    assert weight_rel_error(w, w.clone()) == 0.0


def test_output_rel_error_by_hand() -> None:
    w = torch.tensor([[3.0, 4.0]])
    wq = torch.tensor([[3.0, 0.0]])
    # X = identity: output error is the weight error.
    assert output_rel_error(torch.eye(2), w, wq) == pytest.approx(0.8)
    # X = [1, 1]: X W^T = 7, X Wq^T = 3, so |3 - 7| / 7.
    assert output_rel_error(torch.tensor([[1.0, 1.0]]), w, wq) == pytest.approx(4 / 7)
    # Only what X excites counts: an error on a feature X never uses costs nothing.
    assert output_rel_error(torch.tensor([[1.0, 0.0]]), w, wq) == 0.0


def test_gram_form_equals_activation_form() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 24, generator=g)  # leading dims are flattened
    w = torch.randn(16, 24, generator=g)
    wq = w + 0.05 * torch.randn(16, 24, generator=g)
    h = gram(x)
    assert h.dtype == torch.float64 and h.shape == (24, 24)
    torch.testing.assert_close(h, x.reshape(-1, 24).double().T @ x.reshape(-1, 24).double())
    assert output_rel_error_gram(h, w, wq) == pytest.approx(output_rel_error(x, w, wq), rel=1e-9)


def test_cosine_rows() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, -1.0]])
    torch.testing.assert_close(cosine_rows(a, b), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_perplexity_from_nll() -> None:
    assert perplexity_from_nll(10 * math.log(2), 10) == pytest.approx(2.0)


def test_aggregate_layers_by_hand() -> None:
    layers = [
        {"numel": 100, "storage_bits": 400, "w_err": 0.1, "out_err": 0.2},
        {"numel": 300, "storage_bits": 900, "w_err": 0.3, "out_err": 0.1},
    ]
    agg = aggregate_layers(layers)
    assert agg["bits_per_param"] == pytest.approx(1300 / 400)  # exact totals, not a mean of ratios
    assert agg["w_err"] == pytest.approx(0.2)  # plain mean over layers
    assert agg["out_err"] == pytest.approx(0.15)
    assert agg["out_err_max"] == pytest.approx(0.2)
    assert agg["n_layers"] == 2 and agg["numel"] == 400
    assert aggregate_layers([]) == {}


def test_lqmod_rows_report_quantized_weight_bits(registry) -> None:  # type: ignore[no-untyped-def]
    """bits/param of an lqmod row is QuantizedWeight.bits_per_param(), metadata included."""
    import lqmod
    from lqmod.bench.matrix import parse_spec
    from lqmod.bench.methods import build_method

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    cfg = {"bits": 4, "blocksize": 64, "double_quant": True}
    method = build_method(parse_spec("nf:bits=4,blocksize=64,double_quant=true"), registry)
    q = method.quantize(w, None, 0)
    qw = lqmod.quantize_weight(registry.quantizer("nf"), w, cfg)
    assert bits_per_param(q.storage_bits, w.numel()) == qw.bits_per_param()
    torch.testing.assert_close(q.weight, registry.quantizer("nf").materialize(qw, torch.float32))
