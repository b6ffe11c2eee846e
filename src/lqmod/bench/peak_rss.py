"""Peak resident memory of one quantization, streamed or in memory, in a fresh process.

``python -m lqmod.bench.peak_rss MODEL_DIR OUT --mode stream|memory [--config bits=4,...]
[--quantizer nf] [--sequential --n-calib N --calib-seq-len L]`` prints one JSON line:
the resident set before the step (after every import the step needs), the process's peak
(``VmHWM``, the high-water mark of its own address space), their difference (what the step itself added, at most) and
the wall time. Run it as a subprocess: a peak is a property of a whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["current_rss_bytes", "main", "peak_rss_bytes"]


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def peak_rss_bytes() -> int:
    # Not getrusage's ru_maxrss: Linux carries the *parent's* resident set at fork/exec into the
    # child's ru_maxrss, so a probe spawned by a large process (a long pytest run) reports the
    # parent's size. VmHWM belongs to the address space the exec created.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB; non-Linux fallback


def _batches(model_dir: str, n: int, length: int, vocab: int) -> list[dict[str, Any]]:
    import torch

    tok = Path(model_dir) / "tokenizer.json"
    if tok.exists():
        from lqmod.calibration.text import calibration_batches
        from lqmod.hf import load_local_tokenizer

        return calibration_batches(load_local_tokenizer(model_dir), "causal-lm", "wikitext2", n, length=length)
    # A synthetic model has no tokenizer: random tokens exercise the same computation.
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (1, length), generator=gen)} for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lqmod.bench.peak_rss", description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--mode", choices=("stream", "memory"), required=True)
    p.add_argument("--quantizer", default="nf")
    p.add_argument("--config", default="bits=4,blocksize=64")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--n-calib", type=int, default=4)
    p.add_argument("--calib-seq-len", type=int, default=128)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Everything either path imports, imported before the baseline so neither pays for it.
    import accelerate  # noqa: F401
    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401

    from lqmod.calibration import quantize_model_sequential
    from lqmod.cli import parse_kv
    from lqmod.io import save_checkpoint
    from lqmod.model import quantize_model
    from lqmod.streaming import quantize_pretrained_streamed

    config = parse_kv(args.config)
    lora = {"r": args.rank, "alpha": 2.0 * args.rank}
    vocab = int(transformers.AutoConfig.from_pretrained(args.model_dir).vocab_size)
    batches = _batches(args.model_dir, args.n_calib, args.calib_seq_len, vocab) if args.sequential else None
    baseline, peak_before = current_rss_bytes(), peak_rss_bytes()
    t0 = time.perf_counter()
    if args.mode == "stream":
        report = quantize_pretrained_streamed(args.model_dir, args.quantizer, config, out=args.out, lora=lora,
                                              batches=batches, overwrite=True, progress=False)
    else:
        # What lqmod.hf.load_local_model loads, without the tokenizer (a synthetic model has none).
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.float32, use_safetensors=True
        ).eval()
        if batches is not None:
            report = quantize_model_sequential(model, args.quantizer, config, batches=batches, lora=lora,
                                               progress=False)
        else:
            report = quantize_model(model, args.quantizer, config, lora=lora, progress=False)
        save_checkpoint(model, args.out, overwrite=True)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    mib = 1 << 20
    print(json.dumps({
        "mode": args.mode, "quantizer": args.quantizer, "config": config, "sequential": args.sequential,
        "layers": len(report.layers), "quantized_params": report.n_params,
        "baseline_rss_mib": baseline / mib, "peak_before_mib": peak_before / mib, "peak_rss_mib": peak / mib,
        "step_mib": (peak - baseline) / mib, "seconds": seconds,
        "checkpoint_mib": sum(f.stat().st_size for f in Path(args.out).iterdir()) / mib,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
