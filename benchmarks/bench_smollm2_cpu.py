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
other torch ops, and the rest (Python, autograd engine). The profile times every torch op
as it is dispatched (a ``TorchDispatchMode``, forward and backward alike) on two clocks:
wall time and the process's CPU time. On a shared machine a low-priority process loses
whole scheduler slices, which the wall clock counts and the CPU clock does not, so the CPU
split is the one that means the same on a loaded and on a quiet machine (at more than one
thread it also counts OpenMP spin-waits). "rest" is the unprofiled steps' median CPU time
minus the profiled ops, so the profiler's own overhead is not in it.
``decode``: greedy decoding of 128 new tokens, no grad, interleaved.
``--quick``: a 1 x 16-token step, one round, no decode: a smoke test of the whole command.

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
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lqmod.kernels.reference import REFERENCE
from lqmod.nn.quantized_linear import QuantizedLinear

NF4 = {"bits": 4, "blocksize": 64, "double_quant": True}
LORA = {"r": 16, "alpha": 32.0}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
MATERIALIZE_RANGE = "lqmod::materialize"
BNB_DEQUANTIZE = "bitsandbytes::dequantize"
BNB_GEMM = "bitsandbytes::gemm_4bit"


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
            old.weight.data.clone(),  # type: ignore[operator]
            requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True,
        )  # fmt: skip
        new = new.to("cpu")
        # Keep bnb's plain NF4 layout (no AVX512-BF16 repacking on eval), as lqmod.bench does.
        new.support_avx512bf16_for_cpu = False
        replace_module(model, name, new)
    cfg = LoraConfig(r=int(LORA["r"]), lora_alpha=int(LORA["alpha"]), target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, cfg)


class OpClock(TorchDispatchMode):
    """Wall and CPU seconds of every dispatched torch op, by category (forward and backward).

    lqmod's weight rebuilds (the native kernel is a C call, not a torch op) are timed whole
    by :func:`materialize_ranges`, which tells this mode to leave the ops inside them alone;
    bitsandbytes' ``dequantize_4bit`` is one op, timed here as materialize.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wall: dict[str, float] = {"materialize": 0.0, "matmul": 0.0, "other_ops": 0.0}
        self.cpu: dict[str, float] = dict(self.wall)
        self.ops: dict[str, float] = {}  # CPU seconds per op name, for the top list
        self.op_category: dict[str, str] = {}
        self.count: dict[str, int] = dict.fromkeys(self.wall, 0)  # timed ops (or rebuilds) per category
        self.paused_ops = 0  # ops dispatched inside timed rebuilds (each pays the mode's entry)
        self.paused = False

    def add(self, category: str, wall: float, cpu: float, name: str) -> None:
        self.wall[category] += wall
        self.cpu[category] += cpu
        self.count[category] += 1
        self.ops[name] = self.ops.get(name, 0.0) + cpu
        self.op_category[name] = category

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.paused:
            self.paused_ops += 1
            return func(*args, **(kwargs or {}))
        wall, cpu = time.perf_counter(), time.process_time()
        out = func(*args, **(kwargs or {}))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        name = func.name()  # e.g. "aten::mm", "bitsandbytes::dequantize_4bit"
        self.add(_category(name), wall, cpu, name)
        return out


def _category(op: str) -> str:
    if op.startswith(BNB_DEQUANTIZE):  # dequantize_4bit and the double-quant dequantize_blockwise
        return "materialize"
    # bitsandbytes' CPU gemm_4bit (few tokens, no grad needed for the weight) fuses its
    # dequantize into the product: counted as a matmul.
    return "matmul" if op in MATMUL_OPS or op == BNB_GEMM else "other_ops"


def calibrate(n: int = 3000) -> dict[str, float]:
    """CPU seconds :class:`OpClock` adds per timed op inside its window (``inside``), and per
    op dispatched while paused (``paused``): a trivial op run with and without the mode."""
    x = torch.zeros(4)

    def loop() -> float:
        start = time.process_time()
        for _ in range(n):
            torch.add(x, 1.0)
        return time.process_time() - start

    loop()
    plain = min(loop() for _ in range(3)) / n
    clock = OpClock()
    with clock:
        loop()
    inside = clock.cpu["other_ops"] / n
    clock.paused = True
    with clock:
        paused = min(loop() for _ in range(3)) / n
    return {"plain": plain, "inside": max(0.0, inside - plain), "paused": max(0.0, paused - plain)}


@contextlib.contextmanager
def materialize_ranges(models: list[nn.Module], clock: OpClock | None = None) -> Iterator[None]:
    """Label lqmod's weight rebuilds for the profiler (bitsandbytes' is its own op already),
    and with ``clock`` time each rebuild whole on it."""
    from lqmod.kernels.native.backend import NativeLutBackend

    def timed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        if clock is None or clock.paused:
            with torch.profiler.record_function(MATERIALIZE_RANGE):
                return fn(*args)
        clock.paused = True
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            with torch.profiler.record_function(MATERIALIZE_RANGE):
                return fn(*args)
        finally:
            clock.add("materialize", time.perf_counter() - wall, time.process_time() - cpu, MATERIALIZE_RANGE)
            clock.paused = False

    original = NativeLutBackend.weight

    def weight(self: Any, *args: Any) -> torch.Tensor:
        return timed(original, self, *args)

    NativeLutBackend.weight = weight  # type: ignore[method-assign,assignment]
    patched = []
    for model in models:
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                fn = m._materialize

                def wrapped(q: Any, d: torch.dtype, fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
                    return timed(fn, q, d)

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
    overhead = calibrate()
    for key in models:
        with materialize_ranges([models[key]], clock := OpClock()):
            profiles[key] = profile_one(partial(step, key), clock, statistics.median(cpu_times[key]), overhead)
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
        "profiler_overhead_per_op_cpu_s": {k: float(f"{v:.3g}") for k, v in overhead.items()},
        "note": "methods interleaved step by step; step = forward + backward + AdamW on the LoRA parameters",
    }  # fmt: skip


def profile_one(
    fn: Callable[[], None], clock: OpClock, step_cpu_s: float, overhead: dict[str, float]
) -> dict[str, Any]:
    """One step with every op timed by ``clock``: seconds per category on both clocks.

    The ``*_cpu_s`` figures are corrected for the mode's own cost inside each timed window
    (``overhead`` from :func:`calibrate`, times the number of ops; the ``*_cpu_s_raw`` ones are
    not). ``python_autograd_overhead_cpu_s`` is ``step_cpu_s`` (the unprofiled steps' median
    CPU time) minus the corrected ops, so the mode's per-op cost is left out of it too.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    with clock:
        fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ops_wall = sum(clock.wall.values())
    corrected = {k: max(0.0, v - clock.count[k] * overhead["inside"]) for k, v in clock.cpu.items()}
    corrected["materialize"] = max(0.0, corrected["materialize"] - clock.paused_ops * overhead["paused"])
    top = sorted(((k, v) for k, v in clock.ops.items() if clock.op_category[k] == "other_ops"), key=lambda kv: -kv[1])[
        :8
    ]
    return {
        "wall_s_profiled": round(wall, 3),
        "cpu_s_profiled": round(cpu, 3),
        **{f"{k}_s": round(v, 3) for k, v in clock.wall.items()},
        "python_autograd_overhead_s": round(max(0.0, wall - ops_wall), 3),
        **{f"{k}_cpu_s": round(v, 3) for k, v in corrected.items()},
        "python_autograd_overhead_cpu_s": round(max(0.0, step_cpu_s - sum(corrected.values())), 3),
        **{f"{k}_cpu_s_raw": round(v, 3) for k, v in clock.cpu.items()},
        "op_counts": {**clock.count, "inside_rebuilds": clock.paused_ops},
        "step_cpu_s_unprofiled": round(step_cpu_s, 3),
        "top_other_ops_cpu_s": {k: round(v, 3) for k, v in top},
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
            out: torch.Tensor = m.generate(  # type: ignore[operator]
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
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 x 16 tokens, 1 round, writes *_quick.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.new_tokens, args.rounds = 1, 16, 1, 4, 1
        args.suffix += "_quick"
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run_step(args) if args.what == "step" else run_decode(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
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
