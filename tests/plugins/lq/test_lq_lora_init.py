"""The ``lq-lora`` initializer on a (tiny, random) Llama through ``quantize_model``."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

import lqmod
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.quantize import QuantizationError, quantize_weight
from lqmod.types import InitializerSpec, InitResult, LayerStats

# max_iters keeps the tests fast; the loop keeps its best iterate whatever the cap.
LORA = {"r": 8, "alpha": 16.0, "initializer": "lq-lora", "initializer_config": {"max_iters": 10}}


def tokens() -> torch.Tensor:
    return torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quantizer_config", [("nf", {"bits": 3}), ("rtn", {"bits": 3, "group_size": 32})])
def test_step0_output_is_q_plus_l1l2(tiny_llama: torch.nn.Module, quantizer_config: tuple[str, dict]) -> None:
    name, cfg = quantizer_config
    registry = lqmod.get_registry()
    if name not in registry.quantizers():
        pytest.skip(f"quantizer {name!r} is not installed")
    dense = copy.deepcopy(tiny_llama)
    originals = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_model(tiny_llama, name, cfg, lora=LORA, progress=False)
    spec = registry.quantizer(name)
    layers = dict(iter_lora_layers(tiny_llama))
    assert layers
    for lname, layer in layers.items():
        # The base stays quantized with the layer's own quantizer and config.
        qw = layer.qweight
        assert qw.quantizer == name and spec.config_model.model_validate(qw.config) == spec.config_model(**cfg)
        merged = layer.merged_weight(torch.float64)
        q = spec.materialize(qw, torch.float64)
        delta = (layer.lora_B.double() @ layer.lora_A.double()) * layer.scaling
        torch.testing.assert_close(merged, q + delta)
        # The adapter holds a real correction: step 0 is closer to W than the base alone,
        # and closer than the base a plain quantization (QLoRA's start) gives.
        w = originals[lname].double()
        plain = spec.materialize(quantize_weight(spec, originals[lname], cfg), torch.float64)
        assert float((merged - w).norm()) < 0.97 * float((plain - w).norm()), lname
        with torch.no_grad():
            dense.get_parameter(f"{lname}.weight").copy_(merged.float())
    with torch.no_grad():
        got = tiny_llama(tokens()).logits
        want = dense(tokens()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_adapters(tiny_llama: torch.nn.Module) -> None:
    quantize_model(tiny_llama, "nf", {"bits": 3}, lora=LORA, progress=False)
    x = tokens()
    loss = tiny_llama(x, labels=x).loss
    loss.backward()
    for lname, layer in iter_lora_layers(tiny_llama):
        for p in (layer.lora_A, layer.lora_B):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, lname
        for buf in layer.base.buffers():
            assert buf.grad is None and not buf.requires_grad


def test_rank_too_large_is_refused(tiny_llama: torch.nn.Module) -> None:
    # k_proj / v_proj are (32, 64): rank 32 cannot be a proper decomposition rank.
    with pytest.raises(QuantizationError, match=r"LoRA rank r=32 is the decomposition rank"):
        quantize_model(tiny_llama, "nf", {"bits": 3}, lora={**LORA, "r": 32}, progress=False)


def test_fisher_weighting_needs_fisher(tiny_llama: torch.nn.Module) -> None:
    lora = {**LORA, "initializer_config": {"fisher_weighted": True, "max_iters": 10}}
    with pytest.raises(QuantizationError, match=r"needs stats\.fisher"):
        quantize_model(tiny_llama, "nf", {"bits": 3}, lora=lora, progress=False)
    # With a Fisher for every layer, the weighted decomposition runs.
    model = tiny_llama
    stats = {
        n: LayerStats(fisher=torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(0)) + 0.1)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    quantize_model(model, "nf", {"bits": 3}, lora=lora, stats=stats, progress=False)
    assert len(dict(iter_lora_layers(model))) == len(stats)


class _ForeignBase:
    """An initializer that (wrongly) hands back another quantizer's weight."""

    @staticmethod
    def initialize(**kwargs: object) -> InitResult:
        qweight = kwargs["qweight"]
        assert isinstance(qweight, lqmod.QuantizedWeight)
        out_f, in_f = qweight.shape
        w = torch.randn(out_f, in_f)
        other = quantize_weight(lqmod.get_registry().quantizer("lq"), w, {"rank": 2, "max_iters": 1})
        return InitResult(torch.zeros(8, in_f), torch.zeros(out_f, 8), qweight=other)

    @lqmod.hookimpl
    def lqmod_initializers(self) -> Iterator[InitializerSpec]:
        yield InitializerSpec("foreign-base", lqmod.config.InitializerConfig, self.initialize)


def test_model_refuses_a_replacement_base_of_another_quantizer(tiny_llama: torch.nn.Module) -> None:
    registry = lqmod.Registry()
    registry.register(_ForeignBase(), name="foreign-base-test")
    with pytest.raises(ValueError, match=r"initializer 'foreign-base' returned a replacement base of quantizer 'lq'"):
        quantize_model(tiny_llama, "nf", {"bits": 3}, lora={"r": 8, "initializer": "foreign-base"},
                       registry=registry, progress=False)  # fmt: skip
