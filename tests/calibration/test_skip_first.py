"""skip_first: the first tokens of every sequence (attention sinks) left out of the Hessians."""

from __future__ import annotations

import pytest
import torch
from calib_helpers import left_padded, padded_batch, split_reference

from lqmod.calibration import collect_hessians
from lqmod.calibration.sequential import quantize_model_sequential

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


def reference(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], skip: int) -> dict[str, torch.Tensor]:
    """float64 X^T X over real tokens whose rank within their sequence is >= skip, from raw inputs."""
    return {n: rest for n, (_first, rest, _n) in split_reference(model, NAMES, batches, skip).items()}


@pytest.mark.parametrize("skip", [1, 3])
def test_skip_first_matches_float64_reference(tiny_llama: torch.nn.Module, skip: int) -> None:
    right = padded_batch(0)  # 12, 9 and 5 real tokens, right padding
    batches = [right, left_padded(padded_batch(1)), {"input_ids": right["input_ids"][:1]}]
    stats = collect_hessians(tiny_llama, NAMES, batches, progress=False, skip_first=skip)
    ref = reference(tiny_llama, batches, skip)
    n_real = 2 * (12 + 9 + 5) + 12
    for name in NAMES:
        assert stats[name].n_tokens == n_real - 7 * skip
        torch.testing.assert_close(stats[name].hessian, ref[name], rtol=1e-5, atol=1e-6)
    plain = collect_hessians(tiny_llama, NAMES, batches, progress=False)
    assert plain[NAMES[0]].n_tokens == n_real
    h_plain, h_skip = plain[NAMES[0]].hessian, stats[NAMES[0]].hessian
    assert h_plain is not None and h_skip is not None
    assert not torch.allclose(h_plain, h_skip)


def test_sequential_passes_skip_first(tiny_llama: torch.nn.Module) -> None:
    """The sequential driver's Hessians leave the first tokens out too (same as collect_hessians for block 0)."""
    from calib_helpers import Recorder

    import lqmod_lora_default
    from lqmod.plugins import Registry

    rec = Recorder()
    reg = Registry(autoload=False)
    reg.register(lqmod_lora_default, name="lora-default")
    reg.register(rec, name="rec")
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 101, (1, 16))} for _ in range(3)]
    first = NAMES[0]
    expected = collect_hessians(tiny_llama, [first], batches, progress=False, skip_first=2)[first]
    originals = {n: tiny_llama.get_parameter(f"{n}.weight").detach().clone() for n in NAMES}
    quantize_model_sequential(
        tiny_llama, "rec", {}, batches=batches, targets={"include": [r"layers\.0\.self_attn\.q_proj$"]},
        registry=reg, progress=False, skip_first=2,
    )
    got = rec.stats_by_name(originals)[first]
    assert got is not None and got.n_tokens == 3 * 14 == expected.n_tokens
    torch.testing.assert_close(got.hessian, expected.hessian)


def test_bad_skip_first() -> None:
    from lqmod.calibration import HessianAccumulator

    with pytest.raises(ValueError, match="skip_first must be >= 0"):
        HessianAccumulator({}, skip_first=-1)
