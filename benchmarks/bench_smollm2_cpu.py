"""SmolLM2-135M on CPU: where a LoRA finetuning step's time goes, and greedy decoding speed.

Three models of the same weights, NF4 (blocksize 64, double quantization) on every linear
layer but the head, LoRA rank 16 on each:

* ``lqmod-native``: lqmod's LoRALinear with the backend ``select_backend`` picks on CPU (the
  compiled LUT kernel), materializing the weight in forward and again in backward;
* ``lqmod-torch``: the same layers forced onto the pure-torch reference backend, i.e. lqmod's
  CPU path before the compiled kernel ("before");
* ``bnb+peft``: bitsandbytes ``Linear4bit`` + PEFT LoRA.

``step``: forward+backward+AdamW of a batch (default 2 x 128 tokens), methods interleaved
step by step, then one profiled step each, its time split into materialize (lqmod's
dequantize, bitsandbytes' ``dequantize_4bit``), matmuls (``aten::mm``/``addmm``/``bmm``),
other torch ops, and the rest (Python, autograd engine, profiler bookkeeping).
``decode``: greedy decoding of 128 new tokens, no grad, interleaved.

Writes ``results/smollm2_cpu_step.json`` / ``results/smollm2_cpu_decode.json``. The CPU is
shared with other work: the load average is recorded beside every number.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lqmod.kernels.reference import REFERENCE
from lqmod.nn.quantized_linear import QuantizedLinear

NF4 = {"bits": 4, "blocksize": 64, "double_quant": True}
LORA = {"r": 16, "alpha": 32.0}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
MATERIALIZE_RANGE = "lqmod::materialize"


def _load() -> tuple[nn.Module, Any, list[str]]:
    from lqmod.hf import load_local_model

    model, tok, _ = load_local_model("smollm2")
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    return model, tok, targets


def lqmod_models(base: nn.Module, targets: list[str]) -> tuple[nn.Module, nn.Module]:
    import re

    from lqmod.model import quantize_model

    native = copy.deepcopy(base)
    sel = {"include": tuple(f"^{re.escape(n)}$" for n in targets), "exclude": ()}
    quantize_model(native, "nf", NF4, lora=LORA, targets=sel, seed=0, progress=False)
    ref = copy.deepcopy(native)
    for m in ref.modules():
        if isinstance(m, QuantizedLinear):  # the frozen base of each LoRALinear holds the backend
            m._backend, m._backend_device = REFERENCE, torch.device("cpu")  # the pure-torch path
    return native, ref


def bnb_model(base: nn.Module, targets: list[str]) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from lqmod.model import replace_module

    model = copy.deepcopy(base)
    for name in targets:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(
            old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=torch.float32,
            compress_statistics=True, quant_type="nf4",
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(
            old.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
        )
        new = new.to("cpu")
        # Keep bnb's plain NF4 layout (no AVX512-BF16 repacking on eval), as lqmod.bench does.
        new.support_avx512bf16_for_cpu = False
        replace_module(model, name, new)
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, cfg)


@contextlib.contextmanager
def materialize_ranges(models: list[nn.Module]) -> Iterator[None]:
    """Label lqmod's weight rebuilds for the profiler (bitsandbytes' is its own op already)."""
    from lqmod.kernels.native.backend import NativeLutBackend

    original = NativeLutBackend.weight

    def weight(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.profiler.record_function(MATERIALIZE_RANGE):
            return original(self, *args, **kwargs)

    NativeLutBackend.weight = weight  # type: ignore[method-assign]
    patched = []
    for model in models:
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                fn = m._materialize

                def wrapped(q: Any, d: torch.dtype, fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
                    with torch.profiler.record_function(MATERIALIZE_RANGE):
                        return fn(q, d)

                patched.append((m, fn))
                m._materialize = wrapped
    try:
        yield
    finally:
        NativeLutBackend.weight = original  # type: ignore[method-assign]
        for m, fn in patched:
            m._materialize = fn


def _load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    base, _, targets = _load()
    native, ref = lqmod_models(base, targets)
    models: dict[str, nn.Module] = {"lqmod-native": native, "lqmod-torch": ref}
    with contextlib.suppress(ImportError):
        models["bnb+peft"] = bnb_model(base, targets)
    del base
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=gen)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    for m in models.values():
        m.train()

    def step(key: str) -> None:
        m, opt = models[key], opts[key]
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for key in models:  # warm-up (kernel build, first-touch allocation)
        step(key)
    times: dict[str, list[float]] = {k: [] for k in models}
    # The process's CPU time per step beside the wall time: on a shared machine a
    # low-priority process loses whole scheduler slices, which wall time counts and CPU
    # time does not (at more than one thread CPU time also counts OpenMP spin-waits).
    cpu_times: dict[str, list[float]] = {k: [] for k in models}
    loads = []
    for _ in range(args.steps):
        loads.append(_load_avg())
        for key in models:
            start, cpu_start = time.perf_counter(), time.process_time()
            step(key)
            times[key].append(time.perf_counter() - start)
            cpu_times[key].append(time.process_time() - cpu_start)
    profiles: dict[str, Any] = {k: None for k in models}
    if args.checkpoint:  # timings first: a profile cut short by a time limit keeps them
        Path(args.checkpoint).write_text(
            json.dumps({"times_s": times, "cpu_times_s": cpu_times, "loads": loads}, indent=1) + "\n"
        )
    with materialize_ranges(list(models.values())):
        for key in models:
            profiles[key] = profile_one(lambda key=key: step(key))
    tokens = args.batch * args.seq
    bnb_s = statistics.median(times["bnb+peft"]) if "bnb+peft" in times else None
    bnb_cpu = statistics.median(cpu_times["bnb+peft"]) if "bnb+peft" in cpu_times else None
    rows = {}
    for key, ts in times.items():
        s = statistics.median(ts)
        c = statistics.median(cpu_times[key])
        rows[key] = {
            "step_s": round(s, 3), "step_s_min": round(min(ts), 3), "tokens_per_s": round(tokens / s, 1),
            "tokens_per_s_ratio_to_bnb": round((tokens / s) / (tokens / bnb_s), 3) if bnb_s else None,
            "step_cpu_s": round(c, 3), "step_cpu_s_min": round(min(cpu_times[key]), 3),
            "tokens_per_cpu_s_ratio_to_bnb": round(bnb_cpu / c, 3) if bnb_cpu else None,
            "profile": profiles[key],
        }  # fmt: skip
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), NF4 b64 dq on every linear but lm_head",
        "lora": LORA, "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": torch.get_num_threads(),
        "load_average_per_round": loads, "load_average_at_end": _load_avg(), "results": rows,
        "note": "methods interleaved step by step; step = forward + backward + AdamW on the LoRA parameters",
    }  # fmt: skip


def profile_one(fn: Callable[[], None]) -> dict[str, float]:
    """One profiled call: seconds in materialize, matmuls, other ops, and the rest."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - start
    mat = matmul = self_total = 0.0
    for ev in prof.key_averages():
        self_total += ev.self_cpu_time_total
        if ev.key == MATERIALIZE_RANGE or ev.key.startswith("bitsandbytes::dequantize"):
            mat += ev.cpu_time_total
        elif ev.key in MATMUL_OPS:
            matmul += ev.self_cpu_time_total
    # cpu_time_total of a range includes its children; bnb's op does not nest in another
    # counted one, and no matmul runs inside a materialize range.
    mat, matmul, self_total = mat / 1e6, matmul / 1e6, self_total / 1e6
    other = max(0.0, self_total - mat - matmul)
    return {
        "wall_s_profiled": round(wall, 3),
        "materialize_s": round(mat, 3),
        "matmul_s": round(matmul, 3),
        "other_ops_s": round(other, 3),
        "python_autograd_overhead_s": round(max(0.0, wall - mat - matmul - other), 3),
    }


def run_decode(args: argparse.Namespace) -> dict[str, Any]:
    base, tok, targets = _load()
    native, ref = lqmod_models(base, targets)
    models: dict[str, nn.Module] = {"lqmod-native": native}
    if args.decode_torch:
        models["lqmod-torch"] = ref
    with contextlib.suppress(ImportError):
        models["bnb+peft"] = bnb_model(base, targets)
    models["dense"] = base
    prompt = tok("The capital of France is", return_tensors="pt")
    for m in models.values():
        m.eval()

    def decode(m: nn.Module, n: int) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = m.generate(
                **prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
            )
        return out

    for m in models.values():  # warm-up: kernel build, first-touch allocation
        decode(m, 2)
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {k: [] for k in models}
    loads = []
    for _ in range(args.rounds):
        loads.append(_load_avg())
        for key, m in models.items():
            start = time.perf_counter()
            outputs[key] = decode(m, args.new_tokens)
            times[key].append(time.perf_counter() - start)
    bnb_s = statistics.median(times["bnb+peft"]) if "bnb+peft" in times else None
    rows = {}
    for key, ts in times.items():
        s = statistics.median(ts)
        rows[key] = {
            "decode_s": round(s, 3), "decode_s_min": round(min(ts), 3),
            "tokens_per_s": round(args.new_tokens / s, 2),
            "tokens_per_s_ratio_to_bnb": round(bnb_s / s, 3) if bnb_s else None,
            "same_tokens_as_dense": bool(torch.equal(outputs[key], outputs["dense"])),
        }  # fmt: skip
    return {
        "model": "SmolLM2-135M-Instruct, NF4 b64 dq + LoRA r16 (B = 0) on every linear but lm_head",
        "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "load_average_per_round": loads, "load_average_at_end": _load_avg(), "results": rows,
        "note": "greedy decoding with transformers' generate (KV cache), no grad, methods interleaved",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["step", "decode"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (each runs every method once)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="timed decode rounds (each decodes with every model)")
    ap.add_argument("--decode-torch", action="store_true", help="also decode with the pure-torch backend (slow)")
    ap.add_argument("--checkpoint", help="step: write the raw timings here before profiling")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--suffix", default="", help="appended to the result file's name (smollm2_cpu_step<suffix>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_step(args) if args.what == "step" else run_decode(args)
    result["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("bitsandbytes", "peft", "transformers"):
        with contextlib.suppress(ImportError):
            result["versions"][name] = __import__(name).__version__
    path = Path(args.out) / f"smollm2_cpu_{args.what}{args.suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["results"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
