"""Helpers for the serving-export tests: finetuned tiny OPTQ models of both kinds, a tokenizer,
and a GPTQ reader written from the format description (independent of lqmod's)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from integ_helpers import fake_stats, tiny_llama
from safetensors.torch import load_file
from torch import nn

from lqmod.model import iter_lora_layers, quantize_model

transformers = __import__("pytest").importorskip("transformers")

GROUP = 32
# layers.0 q_proj: 3 bits, act-order, asymmetric (a GPTQModel "dynamic" override);
# layers.1 k_proj stays dense (a "-:" skip rule); every other block linear: 4-bit symmetric.
ODD = "model.layers.0.self_attn.q_proj"
DENSE = "model.layers.1.self_attn.k_proj"


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def optq_plan(model: nn.Module, *, mixed: bool = True) -> dict[str, Any]:
    base = {"bits": 4, "group_size": GROUP, "sym": True}
    modules = {n: {"quantizer": "optq", "config": dict(base)} for n in block_linears(model)}
    if mixed:
        modules[ODD]["config"] = {"bits": 3, "group_size": GROUP, "sym": False, "desc_act": True}
        del modules[DENSE]
    return {"modules": modules}


def randomize_adapters(model: nn.Module, seed: int = 5, scale: float = 0.05) -> None:
    """Non-zero B (and A) as after finetuning, so the adapter visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def lqmod_native(mixed: bool = True, seed: int = 0) -> nn.Module:
    """An lqmod model (LoRALinear layers) with OPTQ bases and 'trained' adapters."""
    model = tiny_llama(seed=seed)
    names = block_linears(model)
    quantize_model(
        model,
        plan=optq_plan(model, mixed=mixed),
        stats=fake_stats(model, names),
        lora={"r": 4, "alpha": 8},
        progress=False,
    )
    randomize_adapters(model)
    return model.eval()


def peft_over_lqmod(tmp: Path, mixed: bool = True, seed: int = 0, **lora: Any) -> Any:
    """A transformers model with OPTQ QuantizedLinear layers (the "lqmod" method), wrapped by
    ``peft.get_peft_model``; LoRA also on the dense ``lm_head``."""
    import peft

    from lqmod.integrations.peft import target_modules
    from lqmod.integrations.transformers import LqmodConfig, quantize_model

    dense = tiny_llama(seed=seed)
    dense.save_pretrained(tmp / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp / "dense")
    names = block_linears(model)
    quantize_model(model, LqmodConfig(plan=optq_plan(model, mixed=mixed)), stats=fake_stats(model, names))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[*target_modules(model), "lm_head"], **lora)
    pm = peft.get_peft_model(model, config)
    randomize_adapters(pm)
    return pm.eval()


def lqmod_logits(model: Any, ids: torch.Tensor, *, adapters: bool = True) -> torch.Tensor:
    """Logits of either model kind, with or without its adapters."""
    with torch.no_grad():
        if hasattr(model, "disable_adapter") and not adapters:
            with model.disable_adapter():
                return model(input_ids=ids).logits.float()
        layers = [m for _, m in iter_lora_layers(model)]
        for m in layers:
            m.adapters_enabled = adapters
        try:
            return model(input_ids=ids).logits.float()
        finally:
            for m in layers:
                m.adapters_enabled = True


def tiny_tokenizer(vocab_size: int = 101) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# -- an independent GPTQ reader -----------------------------------------------------------


def _fields(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` ``bits``-wide fields of each column's little-endian int32 bit stream."""
    stream = words.to(torch.int64) & 0xFFFFFFFF
    bit = ((stream.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, words.shape[1])
    return (bit[: n * bits].view(n, bits, -1) << torch.arange(bits).view(1, bits, 1)).sum(1)


def _grid(name: str, qc: dict[str, Any]) -> dict[str, Any] | None:
    grid = {k: qc[k] for k in ("bits", "group_size")}
    for pattern, override in (qc.get("dynamic") or {}).items():
        if re.match(pattern[2:], name):
            return None if pattern.startswith("-:") else {**grid, **override}
    return grid


def dense_from_gptq(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain transformers model holding the GPTQ checkpoint's weights, dequantized as GPTQModel
    does (v1 zero points: each packed word + 0x..0101 for 2/4/8 bits, each field + 1 for 3;
    v2 zero points as stored)."""
    qc = json.loads((folder / "quantize_config.json").read_text())
    shift = {"gptq": 1, "gptq_v2": 0}[qc["checkpoint_format"]]
    stored = load_file(str(folder / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        module, _, suffix = key.rpartition(".")
        if suffix in ("qzeros", "scales", "g_idx"):
            continue
        if suffix != "qweight":
            state[key] = t
            continue
        grid = _grid(module, qc)
        assert grid is not None, module
        bits, g_idx = int(grid["bits"]), stored[f"{module}.g_idx"].to(torch.int64)
        scales, qz = stored[f"{module}.scales"].float(), stored[f"{module}.qzeros"]
        in_f, out_f = g_idx.numel(), scales.shape[1]
        if bits == 3:
            zeros = (_fields(qz.T, 3, out_f) + shift) % 8
        else:
            ones = shift * sum(1 << s for s in range(0, 32, bits))
            zeros = _fields(((qz.to(torch.int64) & 0xFFFFFFFF) + ones).T & 0xFFFFFFFF, bits, out_f)
        codes = _fields(t, bits, in_f)  # (in, out)
        zeros = zeros.T  # (groups, out)
        weight = scales[g_idx] * (codes - zeros[g_idx]).float()
        state[f"{module}.weight"] = weight.T.contiguous()
    config = transformers.AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    model.tie_weights()
    return model.to(dtype).eval()
