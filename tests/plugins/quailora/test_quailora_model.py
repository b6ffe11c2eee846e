"""quailora through quantize_model on a tiny random Llama, with Hessians from real forward passes."""

from __future__ import annotations

import copy

import pytest
import torch

import lqmod
from lqmod.calibration import collect_hessians
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod_quailora import calibrated_error


def batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 101, (2, 24), generator=gen)} for _ in range(4)]


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


# lq-lora is compared on real MiniLM in benchmarks/bench_init.py: it re-quantizes W - L1 L2, so
# its base differs, and on this random model (flat spectra, near-isotropic inputs) it can win.
def adapted(model: torch.nn.Module, init: str, stats: dict, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """The step-0 merged weight of every layer after quantize_model with initializer ``init``."""
    lora = {"r": 4, "alpha": 8.0, "initializer": init, "initializer_config": cfg or {}}
    quantize_model(model, "nf", {"bits": 3}, lora=lora, stats=stats, progress=False)
    return {n: layer.merged_weight(torch.float64) for n, layer in iter_lora_layers(model)}


def test_quailora_lowers_the_calibrated_error_on_its_base(tiny_llama: torch.nn.Module) -> None:
    names = linear_names(tiny_llama)
    stats = collect_hessians(tiny_llama, names, batches(), progress=False)
    dense = {n: tiny_llama.get_parameter(f"{n}.weight").detach().double().clone() for n in names}
    runs = {
        "default": adapted(copy.deepcopy(tiny_llama), "default", stats),
        "als": adapted(copy.deepcopy(tiny_llama), "quailora", stats, {"max_iters": 200}),
        "exact": adapted(copy.deepcopy(tiny_llama), "quailora", stats, {"method": "exact"}),
    }
    for n in names:
        h = stats[n].hessian
        assert h is not None
        err = {k: calibrated_error(w[n] - dense[n], h) for k, w in runs.items()}
        # The unweighted alternative on the same base: B A = the rank-r SVD truncation of W - Q.
        q = runs["default"][n]
        u, sv, vh = torch.linalg.svd(dense[n] - q, full_matrices=False)
        err["svd"] = calibrated_error(dense[n] - q - (u[:, :4] * sv[:4]) @ vh[:4], h)
        assert err["exact"] < 0.99 * err["default"], (n, err)
        assert err["exact"] < err["svd"], (n, err)
        assert err["als"] < err["default"], (n, err)
        # ALS and the closed form minimise the same (damped) objective: they end together.
        assert err["als"] == pytest.approx(err["exact"], rel=1e-3), (n, err)


def test_the_base_is_the_quantizers_own_and_memory_does_not_grow(tiny_llama: torch.nn.Module) -> None:
    names = linear_names(tiny_llama)
    stats = collect_hessians(tiny_llama, names, batches(), progress=False)
    dense = {n: tiny_llama.get_parameter(f"{n}.weight").detach().clone() for n in names}
    plain = copy.deepcopy(tiny_llama)
    quantize_model(plain, "nf", {"bits": 3}, lora={"r": 4}, progress=False)
    quantize_model(tiny_llama, "nf", {"bits": 3}, lora={"r": 4, "initializer": "quailora"}, stats=stats,
                   progress=False)  # fmt: skip
    spec = lqmod.get_registry().quantizer("nf")
    for (n, layer), (_, _ref) in zip(iter_lora_layers(tiny_llama), iter_lora_layers(plain), strict=True):
        qw = layer.qweight
        own = quantize_weight(spec, dense[n], {"bits": 3})
        assert set(qw.tensors) == set(own.tensors)
        assert all(torch.equal(qw.tensors[k], own.tensors[k]) for k in own.tensors), n
        assert float(layer.lora_B.abs().sum()) > 0  # a real correction, unlike B = 0
    size = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    assert size(tiny_llama) == size(plain)


def test_missing_hessian_is_refused_before_any_layer_changes(tiny_llama: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    expected = r"LoRA initializer 'quailora' needs calibration statistics \['hessian'\]"
    with pytest.raises(QuantizationError, match=expected):
        quantize_model(tiny_llama, "nf", {"bits": 3}, lora={"initializer": "quailora"}, progress=False)
    after = tiny_llama.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_sequential_calibration_gathers_the_hessians_quailora_needs(tiny_llama: torch.nn.Module) -> None:
    from lqmod.calibration import quantize_model_sequential

    quantize_model_sequential(tiny_llama, "nf", {"bits": 3}, lora={"r": 4, "initializer": "quailora"},
                              batches=batches(), progress=False)  # fmt: skip
    layers = dict(iter_lora_layers(tiny_llama))
    assert layers and all(float(layer.lora_B.abs().sum()) > 0 for layer in layers.values())


def test_wrong_hessian_shape_is_refused(tiny_llama: torch.nn.Module) -> None:
    names = linear_names(tiny_llama)
    stats = collect_hessians(tiny_llama, names, batches(), progress=False)
    stats[names[0]].hessian = torch.eye(3, dtype=torch.float64)
    with pytest.raises(QuantizationError, match=r"stats.hessian is \(3, 3\)"):
        quantize_model(tiny_llama, "nf", {"bits": 3}, lora={"initializer": "quailora"}, stats=stats, progress=False)
