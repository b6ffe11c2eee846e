"""Memory of one LoRA finetune step, with and without re-materializing in backward.

For each variant a fresh subprocess loads real all-MiniLM-L6-v2, quantizes it to NF4,
and runs one forward+backward on a batch of real WikiText-2 sentences. Two measures:

* saved-for-backward bytes: the sum of distinct tensor storages autograd keeps between
  forward and backward (via ``saved_tensors_hooks``): exactly what the trick removes;
* peak RSS of the process (``ru_maxrss``) and its growth during the step: the whole-process
  view, noisier (allocator caching), reported for honesty.

Usage: python benchmarks/bench_memory.py [--batch 32] [--seq 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

VARIANTS = {
    "lqmod (materialize in backward)": {"quantize": True, "materialize_in_backward": True},
    "quantized, dense W saved (QLoRA-style autograd)": {"quantize": True, "materialize_in_backward": False},
    "fp32, full finetuning (no LoRA, reference)": {"quantize": False, "materialize_in_backward": True},
}


def _one(variant: dict[str, Any], batch: int, seq: int) -> dict[str, Any]:
    import torch

    from lqmod.data import wikitext_sentences
    from lqmod.hf import load_local_model
    from lqmod.model import lora_parameters, quantize_model

    model, tok, _ = load_local_model("minilm")
    if variant["quantize"]:
        quantize_model(model, "nf", {"bits": 4, "blocksize": 64}, progress=False,
                       lora={"r": 8, "materialize_in_backward": variant["materialize_in_backward"]})
        params = lora_parameters(model)
    else:
        params = list(model.parameters())
    sents = wikitext_sentences()[:batch]
    enc = tok(sents, return_tensors="pt", padding="max_length", truncation=True, max_length=seq)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**enc).last_hidden_state.pow(2).mean()
    loss.backward()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "saved_for_backward_mib": sum(storages.values()) / 2**20,
        "peak_rss_mib": rss_after / 1024,
        "rss_growth_in_step_mib": (rss_after - rss_before) / 1024,
        "trainable_params": sum(p.numel() for p in params),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(_one(VARIANTS[args.variant], args.batch, args.seq)))
        return 0
    from rich.console import Console
    from rich.table import Table

    rows = {}
    for name in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--batch", str(args.batch), "--seq", str(args.seq)],
            check=True, capture_output=True, text=True,
        ).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    table = Table(title=f"one finetune step, all-MiniLM-L6-v2, batch {args.batch} x {args.seq} tokens (CPU)")
    for col in ("variant", "saved for backward MiB", "peak RSS MiB", "RSS growth in step MiB", "trainable"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(name, f"{r['saved_for_backward_mib']:.1f}", f"{r['peak_rss_mib']:.0f}",
                      f"{r['rss_growth_in_step_mib']:.0f}", f"{r['trainable_params']:,}")
    Console(width=130).print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory_cpu.json").write_text(json.dumps(
        {"batch": args.batch, "seq": args.seq, "model": "all-MiniLM-L6-v2", "variants": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
