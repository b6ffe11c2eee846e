"""lqmod optq weights <-> GPTQ packed tensors and checkpoint directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from optq_testdata import calibration_inputs, hessian_stats
from safetensors.torch import load_file, save_file

import lqmod
from lqmod.config import LoRAConfig
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.nn.lora_linear import LoRALinear
from lqmod.types import QuantizedWeight
from lqmod_optq.gptq_checkpoint import GPTQCheckpointError, read_gptq_checkpoint, write_gptq_checkpoint
from lqmod_optq.gptq_format import from_gptq, pack_int32, to_gptq, unpack_int32

torch.set_num_threads(1)
SHAPE = (64, 128)  # out, in: multiples of 32, as GPTQ's 3-bit layout requires


@pytest.fixture(scope="module")
def weight_and_stats() -> tuple[torch.Tensor, lqmod.LayerStats]:
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * 0.02
    return w, hessian_stats(calibration_inputs(SHAPE[1], n_tokens=512, seed=9))


def _quantize(w: torch.Tensor, stats: lqmod.LayerStats, **cfg: object) -> QuantizedWeight:
    return lqmod.quantize_weight(lqmod.get_registry().quantizer("optq"), w, cfg, stats)


def _dequant_gptq(t: dict[str, torch.Tensor], bits: int, v1: bool) -> torch.Tensor:
    """An independent GPTQ dequantizer, written from the format description: (in, out) float32."""
    in_f, out_f = t["g_idx"].numel(), t["scales"].shape[1]
    stream = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    bit_list = ((stream.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, out_f)
    codes = (bit_list[: in_f * bits].view(in_f, bits, out_f) << torch.arange(bits).view(1, bits, 1)).sum(1)
    zstream = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    zbits = ((zstream.unsqueeze(2) >> torch.arange(32)) & 1).reshape(zstream.shape[0], -1)
    zeros = (zbits[:, : out_f * bits].view(-1, out_f, bits) << torch.arange(bits)).sum(2)
    if v1:
        zeros = (zeros + 1) % (1 << bits)  # field-wise, as GPTQModel's 3-bit path; equal absent borrows
    g = t["g_idx"].long()
    return (codes - zeros[g]).float() * t["scales"].float()[g]


def test_pack_int32_is_lsb_first_and_crosses_words_at_3_bits() -> None:
    codes = torch.arange(32).remainder(8).view(32, 1)
    words = pack_int32(codes, 3)
    assert words.shape == (3, 1)
    # Code 10 straddles words 0/1 (low 2 bits at 30-31, high bit at bit 0 of word 1), code 21 words 1/2.
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes.flatten().tolist()))
    expect = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(3)]
    assert [int(w) & 0xFFFFFFFF for w in words.flatten()] == expect
    four = pack_int32(torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]]), 4)
    assert int(four[0, 0]) & 0xFFFFFFFF == 0xF7654321
    for bits in (2, 3, 4, 8):
        c = torch.randint(0, 2**bits, (96, 7), generator=torch.Generator().manual_seed(bits))
        assert torch.equal(unpack_int32(pack_int32(c, bits), bits, 96), c)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_round_trip_is_bit_exact(
    weight_and_stats: tuple[torch.Tensor, lqmod.LayerStats], bits: int, sym: bool, desc_act: bool, fmt: str
) -> None:
    w, stats = weight_and_stats
    qw = _quantize(w, stats, bits=bits, group_size=32, sym=sym, desc_act=desc_act)
    t = to_gptq(qw, checkpoint_format=fmt)
    n_groups = 4
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (SHAPE[1] * bits // 32, SHAPE[0])
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (n_groups, SHAPE[0] * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (n_groups, SHAPE[0])
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (SHAPE[1],)
    spec = lqmod.get_registry().quantizer("optq")
    dense = spec.materialize(qw, torch.float32)
    assert torch.equal(_dequant_gptq(t, bits, v1=fmt == "gptq").T, dense)

    back = from_gptq(t, bits=bits, group_size=32, sym=sym, checkpoint_format=fmt, config=qw.config)
    assert back.config == qw.config
    assert sorted(back.tensors) == sorted(qw.tensors)
    for k, v in qw.tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v), k
    assert back.bits_per_param() == qw.bits_per_param()
    # Without lqmod's config (a foreign checkpoint) the weight is still the same weight.
    foreign = from_gptq(t, bits=bits, group_size=32, sym=sym, checkpoint_format=fmt)
    assert torch.equal(spec.materialize(foreign, torch.float32), dense)
    assert foreign.config["desc_act"] == desc_act
    assert spec.bits_per_param(spec.config_model(**foreign.config), SHAPE) == foreign.bits_per_param()


def test_v1_stores_zero_minus_one(weight_and_stats: tuple[torch.Tensor, lqmod.LayerStats]) -> None:
    w, stats = weight_and_stats
    qw = _quantize(w, stats, bits=4, group_size=32, sym=True)
    v1, v2 = to_gptq(qw, checkpoint_format="gptq"), to_gptq(qw, checkpoint_format="gptq_v2")
    assert torch.all(v2["qzeros"] == 0x88888888 - (1 << 32))  # zero point 8 in every 4-bit field
    assert torch.all(v1["qzeros"] == 0x77777777)
    assert torch.equal(v1["qweight"], v2["qweight"])


def test_zero_point_zero_in_v1_round_trips_and_warns() -> None:
    # A group of non-negative weights has zero point 0, which GPTQ v1 stores as 0 - 1.
    w = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    w[:, 32:] -= 0.01
    stats = hessian_stats(calibration_inputs(64, n_tokens=256))
    qw = _quantize(w, stats, bits=4, group_size=32, sym=False)
    with pytest.warns(UserWarning, match="zero point 0"):
        t = to_gptq(qw, checkpoint_format="gptq")
    back = from_gptq(t, bits=4, group_size=32, sym=False, checkpoint_format="gptq", config=qw.config)
    assert all(torch.equal(back.tensors[k], v) for k, v in qw.tensors.items())


def test_bad_tensors_are_refused(weight_and_stats: tuple[torch.Tensor, lqmod.LayerStats]) -> None:
    w, stats = weight_and_stats
    t = to_gptq(_quantize(w, stats, bits=4, group_size=32))
    with pytest.raises(lqmod.QuantizationError, match=r"\['qzeros'\] are missing"):
        from_gptq({k: v for k, v in t.items() if k != "qzeros"}, bits=4, group_size=32, sym=True)
    with pytest.raises(lqmod.QuantizationError, match="qweight has shape"):
        from_gptq({**t, "qweight": t["qweight"][:-1]}, bits=4, group_size=32, sym=True)
    with pytest.raises(lqmod.QuantizationError, match="int32"):
        from_gptq({**t, "qweight": t["qweight"].to(torch.int64)}, bits=4, group_size=32, sym=True)
    with pytest.raises(lqmod.QuantizationError, match="g_idx spans"):
        from_gptq({**t, "g_idx": t["g_idx"] + 1}, bits=4, group_size=32, sym=True)
    with pytest.raises(lqmod.QuantizationError, match="do not fit"):
        from_gptq(t, bits=4, group_size=64, sym=True)
    with pytest.raises(lqmod.QuantizationError, match="gptq_p"):
        from_gptq(t, bits=4, group_size=32, sym=True, checkpoint_format="gptq_p")
    with pytest.raises(lqmod.QuantizationError, match="multiples of 32"):
        to_gptq(_quantize(w[:, :96][:40], stats_for(96), bits=3, group_size=32))


def stats_for(in_features: int) -> lqmod.LayerStats:
    return hessian_stats(calibration_inputs(in_features, n_tokens=256))


# -- checkpoint directories -----------------------------------------------------------------


def _quantized_llama(model: torch.nn.Module, plan_bits: dict[str, int] | None = None) -> torch.nn.Module:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    names = list(linears)
    stats = {n: stats_for(m.in_features) for n, m in linears.items()}
    plan = {
        "modules": {
            n: {"quantizer": "optq", "config": {"bits": (plan_bits or {}).get(n, 4), "group_size": 32,
                                                 "desc_act": n.endswith("down_proj")}}
            for n in names
        }
    }  # fmt: skip
    quantize_model(model, plan=plan, stats=stats, progress=False)
    return model


def test_checkpoint_directory_round_trip(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    model = _quantized_llama(tiny_llama, {"model.layers.0.self_attn.q_proj": 3})
    layers = dict(iter_lora_layers(model))
    out = write_gptq_checkpoint(model, tmp_path / "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["checkpoint_format"] == "gptq"
    assert qc["dynamic"]["+:^model\\.layers\\.0\\.self_attn\\.q_proj$"]["bits"] == 3
    stored = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.qweight" in stored and "model.embed_tokens.weight" in stored
    assert not any(k.endswith(("lora_A", "lora_B", ".codes")) for k in stored)

    read = read_gptq_checkpoint(out)
    assert sorted(read) == sorted(layers)
    for name, layer in layers.items():
        qw = layer.qweight
        assert read[name].config == qw.config, name
        for k, v in qw.tensors.items():
            assert torch.equal(read[name].tensors[k], v), (name, k)
    # What was read builds a working LoRA layer.
    name = "model.layers.0.mlp.down_proj"
    layer = LoRALinear(
        read[name], lqmod.get_registry().quantizer("optq"), LoRAConfig(r=2),
        lora_a=torch.zeros(2, 128), lora_b=torch.zeros(64, 2),
    )  # fmt: skip
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ layers[name].dense_weight(torch.float32).T)
    # Strip lqmod's own record: a foreign checkpoint must still give the same weights.
    qc["meta"] = {}
    (out / "quantize_config.json").write_text(json.dumps(qc))
    spec = lqmod.get_registry().quantizer("optq")
    for name, qw in read_gptq_checkpoint(out).items():
        assert qw.config["bits"] == layers[name].qweight.config["bits"]
        assert torch.equal(spec.materialize(qw, torch.float32), layers[name].dense_weight(torch.float32))


def test_checkpoint_errors(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(GPTQCheckpointError, match="no optq layers"):
        write_gptq_checkpoint(tiny_llama, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    quantize_model(tiny_llama, "nf", {}, progress=False)
    with pytest.raises(GPTQCheckpointError, match="other quantizers"):
        write_gptq_checkpoint(tiny_llama, tmp_path / "nf")
    assert not (tmp_path / "nf").exists()

    with pytest.raises(GPTQCheckpointError, match="not a directory"):
        read_gptq_checkpoint(tmp_path / "missing")
    folder = tmp_path / "bad"
    folder.mkdir()
    with pytest.raises(GPTQCheckpointError, match=r"quantize_config\.json"):
        read_gptq_checkpoint(folder)
    (folder / "quantize_config.json").write_text("{not json")
    with pytest.raises(GPTQCheckpointError, match="not valid JSON"):
        read_gptq_checkpoint(folder)
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "quant_method": "awq"}))
    with pytest.raises(GPTQCheckpointError, match="only 'gptq'"):
        read_gptq_checkpoint(folder)
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(GPTQCheckpointError, match="pickle"):
        read_gptq_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(GPTQCheckpointError, match="cannot read"):
        read_gptq_checkpoint(folder)
    save_file({"x.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(GPTQCheckpointError, match="no GPTQ layers"):
        read_gptq_checkpoint(folder)
