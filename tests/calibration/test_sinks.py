"""Sink weighting: the first tokens of every sequence re-weighted to a share of tr(X^T X)."""

from __future__ import annotations

import argparse

import pytest
import torch
from calib_helpers import Recorder, left_padded, padded_batch, split_reference
from torch import nn

from lqmod.calibration import HessianAccumulator, collect_hessians
from lqmod.calibration.command import add_sink_options, sink_from_args
from lqmod.calibration.sequential import quantize_model_sequential
from lqmod.calibration.sinks import SinkWeighting, parse_sink_share

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize(("tokens", "share"), [(1, 0.5), (2, 0.25), (1, 0.9)])
def test_sink_share_matches_float64_reference(tiny_llama: nn.Module, tokens: int, share: float) -> None:
    right = padded_batch(0)
    batches = [right, left_padded(padded_batch(1)), {"input_ids": right["input_ids"][:1]}]
    sink = SinkWeighting(tokens=tokens, share=share)
    stats = collect_hessians(tiny_llama, NAMES, batches, progress=False, sink=sink)
    ref = split_reference(tiny_llama, NAMES, batches, tokens)
    for name in NAMES:
        g_first, g_rest, n = ref[name]
        c = share * float(g_rest.trace()) / ((1 - share) * float(g_first.trace()))
        expected = g_rest + c * g_first
        got = stats[name].hessian
        assert got is not None
        # float32 products summed in float64: errors scale with the largest entry (c can be large)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        # every layer gets its own factor: the sink part is exactly `share` of the trace
        assert float((c * g_first).trace() / got.trace()) == pytest.approx(share, rel=1e-6)
        assert stats[name].n_tokens == n  # re-weighted tokens still count


def test_share_zero_is_skip_first(tiny_llama: nn.Module) -> None:
    batches = [padded_batch(0), left_padded(padded_batch(1))]
    a = collect_hessians(tiny_llama, NAMES, batches, progress=False, sink=SinkWeighting(tokens=2, share=0.0))
    b = collect_hessians(tiny_llama, NAMES, batches, progress=False, skip_first=2)
    for name in NAMES:
        assert a[name].n_tokens == b[name].n_tokens
        torch.testing.assert_close(a[name].hessian, b[name].hessian, rtol=0, atol=0)
        torch.testing.assert_close(a[name].act_absmean, b[name].act_absmean, rtol=0, atol=0)


def test_sequential_passes_sink(tiny_llama: nn.Module) -> None:
    import lqmod_lora_default
    from lqmod.plugins import Registry

    rec = Recorder()
    reg = Registry(autoload=False)
    reg.register(lqmod_lora_default, name="lora-default")
    reg.register(rec, name="rec")
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 101, (1, 16))} for _ in range(3)]
    first = NAMES[0]
    sink = SinkWeighting(share=0.5)
    expected = collect_hessians(tiny_llama, [first], batches, progress=False, sink=sink)[first]
    natural = collect_hessians(tiny_llama, [first], batches, progress=False)[first]
    originals = {n: tiny_llama.get_parameter(f"{n}.weight").detach().clone() for n in NAMES}
    quantize_model_sequential(
        tiny_llama, "rec", {}, batches=batches, targets={"include": [r"layers\.0\.self_attn\.q_proj$"]},
        registry=reg, progress=False, sink=sink,
    )
    got = rec.stats_by_name(originals)[first]
    assert got is not None and got.n_tokens == 48
    torch.testing.assert_close(got.hessian, expected.hessian)
    assert got.hessian is not None and natural.hessian is not None
    assert not torch.allclose(got.hessian, natural.hessian)


class _Proj(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_sink_share_protects_the_sink_output_under_optq() -> None:
    """The mechanism found on SmolLM2, on a synthetic layer: a sink token that lives in directions
    ordinary tokens hardly use is cheap in the natural H, so OPTQ's error feedback dumps rounding
    error on its output; re-weighting it to half the trace makes its output nearly exact again,
    at a small cost to the other tokens."""
    from lqmod_optq.config import OPTQConfig
    from lqmod_optq.quantizer import materialize, quantize

    g = torch.Generator().manual_seed(0)
    d_in, d_out, seqs, length, k = 128, 64, 16, 32, 16
    weight = torch.randn(d_out, d_in, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    q = q.float()  # a rotation, so the features are correlated and OPTQ's error feedback acts
    spread = torch.ones(d_in)
    spread[-k:] = 0.02  # ordinary tokens hardly use the last k directions ...
    x = (torch.randn(seqs, length, d_in, generator=g) * spread) @ q.T
    x[:, 0] = torch.randn(seqs, k, generator=g) @ q[:, -k:].T  # ... where the sink lives, at 0.5% of tr H
    model = _Proj(weight)
    batches = [{"x": x[i : i + 4]} for i in range(0, seqs, 4)]
    cfg = OPTQConfig(bits=3, group_size=32)

    def errors(sink: SinkWeighting | None) -> tuple[float, float]:
        stats = collect_hessians(model, ["lin"], batches, progress=False, sink=sink)["lin"]
        dw = materialize(quantize(weight, cfg, stats), torch.float32) - weight
        first, rest = x[:, 0].reshape(-1, d_in), x[:, 1:].reshape(-1, d_in)
        return (
            float((first @ dw.T).norm() / (first @ weight.T).norm()),
            float((rest @ dw.T).norm() / (rest @ weight.T).norm()),
        )

    natural_first, natural_rest = errors(None)
    sink_first, sink_rest = errors(SinkWeighting(share=0.5))
    assert sink_first < 0.3 * natural_first, (natural_first, sink_first)
    assert sink_rest < 1.3 * natural_rest, (natural_rest, sink_rest)


def test_bad_sink_settings() -> None:
    with pytest.raises(ValueError, match="share"):
        SinkWeighting(share=1.0)
    with pytest.raises(ValueError, match="tokens"):
        SinkWeighting(tokens=0, share=0.5)
    with pytest.raises(ValueError, match="not both"):
        HessianAccumulator({}, skip_first=1, sink=SinkWeighting(share=0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        parse_sink_share("1.5")
    with pytest.raises(ValueError, match="a number"):
        parse_sink_share("half")
    assert parse_sink_share("none") is None
    assert parse_sink_share("auto") == "auto"


def test_cli_flags() -> None:
    p = argparse.ArgumentParser()
    add_sink_options(p, "calib-")
    assert sink_from_args(p.parse_args([])) is None  # auto without a model kind: natural
    # auto (the default): re-weighted for a causal LM, natural for an encoder
    assert sink_from_args(p.parse_args([]), model_kind="causal-lm") == SinkWeighting(tokens=1, share=0.5)
    assert sink_from_args(p.parse_args([]), model_kind="encoder") is None
    assert sink_from_args(p.parse_args(["--calib-sink-share", "none"]), model_kind="causal-lm") is None
    # an explicit --skip-first wins over the default
    assert sink_from_args(p.parse_args(["--calib-skip-first", "1"]), model_kind="causal-lm") == SinkWeighting(
        tokens=1, share=0.0
    )
    assert sink_from_args(p.parse_args(["--calib-sink-share", "0.5"])) == SinkWeighting(tokens=1, share=0.5)
    assert sink_from_args(p.parse_args(["--calib-skip-first", "2"])) == SinkWeighting(tokens=2, share=0.0)
    with pytest.raises(ValueError, match="not both"):
        sink_from_args(p.parse_args(["--calib-skip-first", "2", "--calib-sink-share", "0.5"]))


def test_cache_keys() -> None:
    """Natural weights and skip_first keep earlier versions' keys; each share gets its own."""
    assert SinkWeighting(tokens=3, share=0.0).cache_extra() == {"skip_first": 3}
    a = SinkWeighting(share=0.5).cache_extra()
    b = SinkWeighting(share=0.25).cache_extra()
    assert a != b and "skip_first" not in a
