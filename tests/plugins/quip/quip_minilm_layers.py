"""Layer output error of quip and the baselines on real all-MiniLM-L6-v2 weights.

Hessians ``X^T X`` come from WikiText-2 calibration sentences; the error is measured on the
activations of *held-out* sentences: ``||(W - Q) X|| / ||W X||``, computed exactly from the
held-out Gram matrix ``G = X^T X`` as ``sqrt(tr(E G E^T) / tr(W G W^T))``.

Run directly for the full table (all 36 matrices):
``python tests/plugins/quip/quip_minilm_layers.py [layer indices ...]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import lqmod
from lqmod.quantize import quantize_weight
from lqmod.types import LayerStats

SUBLAYERS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclass(frozen=True)
class Row:
    layer: str
    method: str
    bits_per_param: float
    error: float


def layer_names(layers: Sequence[int]) -> list[str]:
    return [f"encoder.layer.{i}.{s}" for i in layers for s in SUBLAYERS]


def _batches(tokenizer: object, sentences: list[str], size: int = 32) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(sentences), size):
        enc = tokenizer(sentences[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")  # type: ignore[operator]
        out.append(dict(enc))
    return out


def grams(
    layers: Sequence[int], n_calib: int = 256, n_eval: int = 128
) -> tuple[dict[str, torch.Tensor], dict[str, LayerStats], dict[str, torch.Tensor]]:
    """(weights, calibration stats, held-out Gram matrices) of the named MiniLM layers."""
    from lqmod.bench.calib import capture_grams, sentence_splits
    from lqmod.data import wikitext_sentences
    from lqmod.hf import load_local_model

    model, tokenizer, _ = load_local_model("minilm")
    splits = sentence_splits(wikitext_sentences(), n_calib, n_eval, 0, seed=0)
    names = layer_names(layers)
    calib, counts = capture_grams(model, names, _batches(tokenizer, splits.calib), progress=False)
    held, _ = capture_grams(model, names, _batches(tokenizer, splits.eval), progress=False)
    weights = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    stats = {n: LayerStats(hessian=calib[n], n_tokens=counts[n]) for n in names}
    return weights, stats, held


def output_error(w: torch.Tensor, q: torch.Tensor, gram: torch.Tensor) -> float:
    e = q.double() - w.double()
    num = torch.einsum("ij,jk,ik->", e, gram, e)
    den = torch.einsum("ij,jk,ik->", w.double(), gram, w.double())
    return float((num / den).sqrt())


def methods(bits: int) -> dict[str, Callable[[torch.Tensor, LayerStats], tuple[torch.Tensor, float]]]:
    """Name -> fn(weight, stats) -> (dequantized weight, bits per parameter)."""
    reg = lqmod.get_registry()

    def plugin(name: str, cfg: dict[str, object]) -> Callable[[torch.Tensor, LayerStats], tuple[torch.Tensor, float]]:
        spec = reg.quantizer(name)

        def run(w: torch.Tensor, st: LayerStats) -> tuple[torch.Tensor, float]:
            qw = quantize_weight(spec, w, cfg, st)
            return spec.materialize(qw, torch.float32), qw.bits_per_param()

        return run

    def hqq(w: torch.Tensor, st: LayerStats) -> tuple[torch.Tensor, float]:
        from lqmod.bench.baselines.hqq import HQQ

        res = HQQ(bits=bits, group_size=64).quantize(w)
        return res.weight, res.storage_bits / w.numel()

    out = {
        f"quip{bits}": plugin("quip", {"bits": bits}),
        f"nf{bits}-b64-dq": plugin("nf", {"bits": bits, "blocksize": 64, "double_quant": True}),
        f"rtn{bits}-g64": plugin("rtn", {"bits": bits, "group_size": 64}),
    }
    if bits == 2:
        out[f"hqq{bits}-g64"] = hqq
    return out


def measure(layers: Sequence[int], bits_list: Sequence[int]) -> list[Row]:
    weights, stats, held = grams(layers)
    rows = []
    for name, w in weights.items():
        for bits in bits_list:
            for method, fn in methods(bits).items():
                q, bpp = fn(w, stats[name])
                rows.append(Row(name.removeprefix("encoder."), method, bpp, output_error(w, q, held[name])))
    return rows


def table(rows: Sequence[Row]) -> str:
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    layers = list(dict.fromkeys(r.layer for r in rows))
    meths = list(by_method)
    lines = ["| layer | " + " | ".join(meths) + " |", "|---" * (len(meths) + 1) + "|"]
    for layer in layers:
        cells = [next(f"{r.error:.4f}" for r in by_method[m] if r.layer == layer) for m in meths]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    avg = [sum(r.error for r in by_method[m]) / len(by_method[m]) for m in meths]
    bpp = [sum(r.bits_per_param for r in by_method[m]) / len(by_method[m]) for m in meths]
    lines.append("| **mean error** | " + " | ".join(f"**{a:.4f}**" for a in avg) + " |")
    lines.append("| mean bits/param | " + " | ".join(f"{b:.3f}" for b in bpp) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    chosen = [int(a) for a in sys.argv[1:]] or list(range(6))
    print(table(measure(chosen, (2, 3, 4))), flush=True)
