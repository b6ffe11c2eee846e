"""Step-0 LoRA initialization (default / lq-lora / quailora) and ICQ vs plain NF on real models.

``--part init`` is a thin wrapper over ``lqmod bench init`` (:mod:`lqmod.bench.init_bench`: the
default matrix, the row cache, the report), kept so the committed commands still run. ``--part
icq`` (plain NF-k vs icq over NF-k; same block: +0.127 bits; block 128: exactly the bits of plain
NF-k at block 64; mean code entropy, weight and output error, fidelity) runs here, on the same
row-cached machinery (:mod:`lqmod.bench.step0`).

Calibration is the WikiText-2 *validation* split (``lqmod.calibration.text``); MiniLM
fidelity uses held-out sentences of the raw test split, SmolLM2 perplexity the first
``--ppl-tokens`` tokens of the raw test split at context ``--ctx``. Never calibrated on test.

    python benchmarks/bench_init.py --model minilm --part init       # = lqmod bench init --model minilm
    python benchmarks/bench_init.py --model smollm2 --part init
    python benchmarks/bench_init.py --model minilm --part icq
    python benchmarks/bench_init.py --model minilm --part init --report-only   # tables from the cache
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import lqmod
from lqmod.bench import fidelity
from lqmod.bench.step0 import Row, Workload, WorkloadSettings, end_fidelity, layer_metrics, load_workload, run_cached
from lqmod.quantize import quantize_weight

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "lqmod.bench_init/1"


def base_configs(base: str, bits: int) -> dict[str, Any]:
    if base == "nf":
        return {"bits": bits, "blocksize": 64, "double_quant": True}
    return {"bits": bits}


ICQ_TAU_N = 12  # candidates per side in the benchmark (paper: 51; the sensitivity row checks it)


def icq_rows() -> list[Row]:
    rows = [Row("fp", {}, "none", label="fp")]
    # Block 128 (the equal-bits pairing) at 3 and 4 bits only, and no tau_n=51 row: on the shared
    # 2-core machine an icq row of MiniLM took ~5 min at tau_n=12 (run --rows to add them).
    for bits in (3, 4, 2):
        nf64 = base_configs("nf", bits)
        nf128 = {**nf64, "blocksize": 128}
        rows.append(Row("nf", nf64, "plain", label=f"nf{bits} b64"))
        rows.append(Row("icq", {"base_config": nf64, "tau_n": ICQ_TAU_N}, "plain", label=f"icq-nf{bits} b64"))
        if bits != 2:
            rows.append(Row("nf", nf128, "plain", label=f"nf{bits} b128"))
            rows.append(Row("icq", {"base_config": nf128, "tau_n": ICQ_TAU_N}, "plain", label=f"icq-nf{bits} b128"))
    return rows


def run_icq_row(w: Workload, row: Row, _shared: Any = None) -> dict[str, Any]:
    from lqmod_icq import base_qweight, block_codes, block_entropy

    registry = lqmod.get_registry()
    spec = registry.quantizer(row.base)
    nf = registry.quantizer("nf")
    layers, merged = [], {}
    t0 = time.perf_counter()
    violations = shifted = blocks = 0
    for name in tqdm(w.targets, desc=row.label, leave=False):
        weight = w.model.get_submodule(name).weight.data.float()
        qw = quantize_weight(spec, weight, row.base_config, name=name)
        dense = spec.materialize(qw, torch.float32)
        if row.base == "icq":
            inner = base_qweight(qw)
            plain = quantize_weight(nf, weight, row.base_config["base_config"], name=name)
            codes, bits = block_codes(nf, inner)
            plain_codes, _ = block_codes(nf, plain)
            h, h0 = block_entropy(codes, bits), block_entropy(plain_codes, bits)
            moved = qw.tensors["tau_codes"] != 0
            # The claims, over every block of the model: entropy strictly up where shifted,
            # the plain codes exactly where not.
            violations += int((h[moved] <= h0[moved]).sum())
            violations += int((codes[~moved] != plain_codes[~moved]).any(dim=1).sum())
            shifted += int(moved.sum())
        else:
            codes, bits = block_codes(nf, qw)
            h = block_entropy(codes, bits)
        blocks += int(h.numel())
        rec = layer_metrics(w, name, dense)
        rec.update(bits_per_param=qw.bits_per_param(), entropy=float(h.mean()), max_entropy=float(bits))
        layers.append(rec)
        merged[name] = dense
    seconds = time.perf_counter() - t0
    with fidelity.swapped_weights(w.model, merged):
        fid = end_fidelity(w)
    extra = {"shifted_blocks": shifted, "entropy_violations": violations} if row.base == "icq" else {}
    return {"layers": layers, "quantize_seconds": seconds, "fidelity": fid, "blocks": blocks, **extra}


def run_icq(args: argparse.Namespace) -> dict[str, Any]:
    ws = WorkloadSettings(model=args.model, n_calib=args.n_calib, n_eval=args.n_eval, ctx=args.ctx,
                          ppl_tokens=args.ppl_tokens, cache=Path(args.cache))  # fmt: skip
    wanted = [p for p in (args.rows or "").split(",") if p]
    results = run_cached(icq_rows(), cache=Path(args.cache) / f"{args.model}-icq", schema=SCHEMA,
                         workload=None if args.report_only else (lambda: load_workload(ws)), run_row=run_icq_row,
                         compute=lambda r: not wanted or any(p in r.label for p in wanted),
                         desc=f"{args.model} icq rows")  # fmt: skip
    return {**results, "part": "icq"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--part", choices=["init", "icq"], default="init")
    p.add_argument("--rows", help="comma-separated label substrings: run only matching rows")
    p.add_argument("--n-calib", type=int, default=None, help="calibration sentences (MiniLM) or windows (SmolLM2)")
    p.add_argument("--n-eval", type=int, default=256, help="MiniLM: held-out sentences (x2: statistics + fidelity)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lqmod" / "bench_init"))
    p.add_argument("--report-only", action="store_true", help="write the report from cached rows, compute nothing")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.part == "init":
        from lqmod.bench.command import main as bench_main

        argv = ["bench", "init", "--model", args.model, "--n-eval", str(args.n_eval), "--ctx", str(args.ctx),
                "--ppl-tokens", str(args.ppl_tokens), "--cache", args.cache, "--out", args.out]  # fmt: skip
        argv += ["--n-calib", str(args.n_calib)] if args.n_calib else []
        argv += ["--rows", args.rows] if args.rows else []
        argv += ["--report-only"] if args.report_only else []
        return bench_main(argv)
    from bench_init_report import write_report  # the icq tables and plots live beside this script

    write_report(run_icq(args), Path(args.out), args.model, args.part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
