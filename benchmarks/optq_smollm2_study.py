"""Why OPTQ-3 lost to NF3 on SmolLM2-135M (issue 11, part 1): measurements that separate the causes.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF, so its linear weights lie on an asymmetric 4-bit
grid with blocks of 32 input columns. Every experiment below swaps dequantized weights into the
one fp32 model and measures

* WikiText-2 raw *test* perplexity on the first ``n_eval`` windows of ``ctx`` tokens;
* per-layer relative output error ``sqrt(tr(dW G dW^T) / tr(W G W^T))`` with ``G = X^T X`` on the
  *held-out* activations of those same evaluation windows (the fp model's), and on the
  calibration activations (what OPTQ minimises), so overfitting shows as the gap between the two.

Calibration text is the WikiText-2 *validation* split (``lqmod.calibration.calibration_batches``),
disjoint from the test text. Hessians of the fp model are cached under ``--cache``.

    python benchmarks/optq_smollm2_study.py --exp baseline --n-eval 8
    python benchmarks/optq_smollm2_study.py --exp by-type
    python benchmarks/optq_smollm2_study.py --exp variants
    python benchmarks/optq_smollm2_study.py --exp sequential

Results accumulate in ``benchmarks/results/optq_smollm2_study.json`` (one entry per row, keyed by
its label, so a rerun of one experiment replaces only its rows) and the markdown table
``benchmarks/results/optq_smollm2_study.md`` is rewritten from the JSON every time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lqmod.bench.calib import token_splits, wikitext_raw_text
from lqmod.bench.fidelity import perplexity, swapped_weights
from lqmod.calibration import collect_hessians
from lqmod.calibration.text import calibration_batches
from lqmod.hf import load_local_model
from lqmod.plugins import get_registry
from lqmod.quantize import quantize_weight
from lqmod.types import LayerStats

RESULTS = Path(__file__).parent / "results"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Layers fed the same tensor share one Gram: the first of each group stands for the others.
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
NF3 = ("nf", {"bits": 3, "blocksize": 64, "double_quant": True})


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.model, self.tok, _ = load_local_model("smollm2")
        self.model.eval()
        self.names = [n for n, m in self.model.named_modules() if n.split(".")[-1] in TYPES]
        ids = self.tok(wikitext_raw_text(), return_tensors="pt").input_ids[0]
        self.eval_windows = token_splits(
            ids, n_calib=0, n_eval=args.n_eval, n_train=0, ctx=args.ctx, eval_ctx=args.ctx
        ).eval
        self.registry = get_registry()
        self._held: dict[str, torch.Tensor] | None = None
        self._held_first: dict[str, torch.Tensor] = {}
        self._fp_ppl: float | None = None

    # -- statistics ---------------------------------------------------------------------------
    def _grams(self, tag: str, batches: Sequence[Mapping[str, Any]]) -> dict[str, LayerStats]:
        """Grams of the fp model for the representative layer of each shared input (cached)."""
        path = self.cache / f"grams-{tag}.pt"
        if path.exists():
            loaded: dict[str, LayerStats] = torch.load(path, weights_only=False)
            return loaded
        reps = [n for n in self.names if n.split(".")[-1] not in SHARED_INPUT]
        t0 = time.time()
        with torch.inference_mode():
            stats = collect_hessians(self.model, reps, batches, progress=False)
        print(f"  grams {tag}: {len(batches)} batches in {time.time() - t0:.0f} s")
        torch.save(stats, path)
        return stats

    def capped_stats(self, n: int, length: int, cap: float, *, exact: bool = False) -> dict[str, LayerStats]:
        """Hessians whose first-token part is scaled down to at most ``cap`` of the trace (``exact``:
        scaled up or down to exactly ``cap``)."""
        batches = calibration_batches(self.tok, "causal-lm", "wikitext2", n, length=length)
        full = self._grams(f"calib-{n}x{length}+0", batches)
        first = self._grams(f"calib-{n}x{length}+0-first", _first_tokens(batches))
        out = {}
        for k, v in full.items():
            f = first[k].hessian
            assert v.hessian is not None and f is not None
            rest = v.hessian - f
            t_rest, t_first = float(rest.diagonal().sum()), float(f.diagonal().sum())
            scale = cap * t_rest / ((1 - cap) * t_first) if t_first > 0 else 1.0
            if not exact:
                scale = min(1.0, scale)
            out[k] = LayerStats(hessian=rest + scale * f, n_tokens=v.n_tokens)
        return {name: out[_rep(name)] for name in self.names}

    def stats(self, n: int, length: int, offset: int = 0, *, drop_first: bool = False) -> dict[str, LayerStats]:
        """Calibration Hessians of every target (shared inputs point at one LayerStats).

        ``drop_first``: without each window's first token (subtracting its Gram, which a causal
        model computes from that token alone, so length-1 forwards give it exactly).
        """
        batches = calibration_batches(self.tok, "causal-lm", "wikitext2", n, length=length, offset=offset)
        reps = self._grams(f"calib-{n}x{length}+{offset}", batches)
        if drop_first:
            first = self._grams(f"calib-{n}x{length}+{offset}-first", _first_tokens(batches))
            reps = {
                k: LayerStats(hessian=v.hessian - first[k].hessian, n_tokens=v.n_tokens - first[k].n_tokens)  # type: ignore[operator]
                for k, v in reps.items()
            }
        return {name: reps[_rep(name)] for name in self.names}

    def held_out(self) -> dict[str, torch.Tensor]:
        if self._held is None:
            batches = [{"input_ids": w.unsqueeze(0)} for w in self.eval_windows]
            digest = hashlib.sha1(self.eval_windows.numpy().tobytes()).hexdigest()[:10]
            reps = self._grams(f"heldout-{digest}", batches)
            first = self._grams(f"heldout-{digest}-first", _first_tokens(batches))
            self._held = {name: reps[_rep(name)].hessian for name in self.names}  # type: ignore[misc]
            self._held_first = {name: first[_rep(name)].hessian for name in self.names}  # type: ignore[misc]
        return self._held

    # -- measures -----------------------------------------------------------------------------
    def ppl(self, weights: Mapping[str, torch.Tensor]) -> float:
        with torch.inference_mode(), swapped_weights(self.model, weights):
            return perplexity(self.model, self.eval_windows, batch_size=4)

    def fp_ppl(self) -> float:
        if self._fp_ppl is None:
            self._fp_ppl = self.ppl({})
        return self._fp_ppl

    def weight(self, name: str) -> torch.Tensor:
        w = self.model.get_submodule(name).weight
        assert isinstance(w, torch.Tensor)
        return w.detach()

    def quantize(
        self, quantizer: str, config: Mapping[str, Any], stats: Mapping[str, LayerStats] | None, names: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Dense dequantized weights of ``names`` and their exact bits/param."""
        spec = self.registry.quantizer(quantizer)
        out: dict[str, torch.Tensor] = {}
        bits = 0.0
        numel = 0
        for name in names:
            w = self.weight(name)
            qw = quantize_weight(spec, w, dict(config), None if stats is None else stats[name], name=name)
            out[name] = spec.materialize(qw, torch.float32)
            bits += qw.bits_per_param() * w.numel()
            numel += w.numel()
        return out, bits / max(numel, 1)

    def errors(self, dense: Mapping[str, torch.Tensor], calib: Mapping[str, LayerStats] | None) -> dict[str, Any]:
        held = self.held_out()
        per: dict[str, dict[str, float]] = {}
        for name, q in dense.items():
            w = self.weight(name).double()
            first = self._held_first[name]
            row = {
                "heldout": rel_out_err(held[name], w, q.double()),
                # the windows' first tokens (attention sinks) apart from all the others
                "heldout_rest": rel_out_err(held[name] - first, w, q.double()),
                "heldout_first": rel_out_err(first, w, q.double()),
            }
            if calib is not None:
                h = calib[name].hessian
                assert h is not None
                row["calib"] = rel_out_err(h, w, q.double())
            per[name] = row
        by_type = {}
        for t in TYPES:
            rows = [r for n, r in per.items() if n.endswith(t)]
            if rows:
                by_type[t] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        mean = {k: sum(r[k] for r in per.values()) / len(per) for k in next(iter(per.values()))}
        return {"mean": mean, "by_type": by_type, "per_layer": per}


def _first_tokens(batches: Sequence[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b["input_ids"][:, :1]} for b in batches]


def _rep(name: str) -> str:
    head, _, last = name.rpartition(".")
    return f"{head}.{SHARED_INPUT[last]}" if last in SHARED_INPUT else name


def rel_out_err(g: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``sqrt(tr(dW G dW^T) / tr(W G W^T))`` in float64."""
    g = g.double()
    d = q - w
    num = float(((d @ g) * d).sum().clamp(min=0))
    den = float(((w @ g) * w).sum())
    return math.sqrt(num / den)


# -- results -------------------------------------------------------------------------------------
def load_results() -> dict[str, Any]:
    path = RESULTS / "optq_smollm2_study.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_results(res: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optq_smollm2_study.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    lines = [
        "| experiment | row | layers | bits/param | ppl | held-out out err | ... first tokens | ... other tokens "
        "| calib out err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in sorted(res["rows"].items(), key=lambda kv: (kv[1]["exp"], kv[1].get("order", 0))):
        err = r.get("errors", {}).get("mean", {})
        lines.append(
            f"| {r['exp']} | {label} | {r.get('layers', 'all')} | {r.get('bits', float('nan')):.3f} | "
            f"{r['ppl']:.2f} | {err.get('heldout', float('nan')):.4f} | {err.get('heldout_first', float('nan')):.4f} | "
            f"{err.get('heldout_rest', float('nan')):.4f} | {err.get('calib', float('nan')):.4f} |"
        )
    lines += [
        "",
        "Held-out relative output error by layer type, windows' first tokens / all other tokens:",
        "",
        "| row | " + " | ".join(TYPES) + " |",
        "|---|" + "---|" * len(TYPES),
    ]
    for label, r in res["rows"].items():
        by = r.get("errors", {}).get("by_type", {})
        if by and all("heldout_first" in by.get(t, {}) for t in TYPES):
            cells = [f"{by[t]['heldout_first']:.3f} / {by[t]['heldout_rest']:.3f}" for t in TYPES]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (RESULTS / "optq_smollm2_study.md").write_text("\n".join(lines) + "\n")


def record(res: dict[str, Any], label: str, **row: Any) -> None:
    # Re-read first: another experiment may have added rows since this one started.
    res["rows"] = {**res["rows"], **load_results()["rows"]}
    row["order"] = res["rows"].get(label, {}).get("order", len(res["rows"]))
    res["rows"][label] = row
    save_results(res)
    err = row.get("errors", {}).get("mean", {})
    print(f"{label:60s} bits {row.get('bits', 0):.3f} ppl {row['ppl']:8.2f} "
          f"held {err.get('heldout', float('nan')):.4f} first {err.get('heldout_first', float('nan')):.4f} "
          f"rest {err.get('heldout_rest', float('nan')):.4f} calib {err.get('calib', float('nan')):.4f}", flush=True)


# -- experiments -----------------------------------------------------------------------------
def run_row(
    st: Study, res: dict[str, Any], exp: str, label: str, quantizer: str, config: Mapping[str, Any],
    stats: Mapping[str, LayerStats] | None, names: Sequence[str] | None = None, layers: str = "all",
    extra: Mapping[str, Any] | None = None, with_ppl: bool = True,
) -> dict[str, torch.Tensor]:
    names = list(names or st.names)
    t0 = time.time()
    dense, bits = st.quantize(quantizer, config, stats, names)
    tq = time.time() - t0
    errs = st.errors(dense, stats)
    ppl = st.ppl(dense) if with_ppl else float("nan")
    record(res, label, exp=exp, quantizer=quantizer, config=dict(config), bits=bits, ppl=ppl, layers=layers,
           errors=errs, quantize_s=round(tq, 1), n_eval_tokens=st.eval_windows.numel(), **dict(extra or {}))
    return dense


def exp_baseline(st: Study, res: dict[str, Any]) -> None:
    record(res, "fp32", exp="baseline", bits=32.0, ppl=st.fp_ppl(), n_eval_tokens=st.eval_windows.numel())
    stats = st.stats(st.args.n_calib, st.args.ctx)
    run_row(st, res, "baseline", "nf3 b64 dq", *NF3, stats)
    run_row(st, res, "baseline", "optq3 g64 sym (default)", "optq", {"bits": 3, "group_size": 64}, stats)


OPTQ3 = {"bits": 3, "group_size": 64}


def exp_by_type(st: Study, res: dict[str, Any]) -> None:
    """One layer type at a time (the other layers stay fp32): which type makes perplexity explode."""
    stats = st.stats(st.args.n_calib, st.args.ctx)
    types = st.args.types.split(",") if st.args.types else TYPES
    for t in types:
        names = [n for n in st.names if n.endswith(t)]
        for label, (q, cfg) in {"optq3 g64 sym": ("optq", OPTQ3), "nf3 b64 dq": NF3}.items():
            run_row(st, res, "by-type", f"{label} | only {t}", q, cfg, stats, names, layers=t)


def exp_sink(st: Study, res: dict[str, Any]) -> None:
    """The windows' first tokens (attention sinks, massive activations) left out of the Hessians."""
    full = st.stats(st.args.n_calib, st.args.ctx)
    rest = st.stats(st.args.n_calib, st.args.ctx, drop_first=True)
    only = st.args.only.split(";") if st.args.only else None
    rows = {
        "optq3 g64 sym, H without first tokens": ("optq", OPTQ3, rest, True),
        # errors only: their perplexities are the baseline rows'
        "optq3 g64 sym (errors)": ("optq", OPTQ3, full, False),
        "nf3 b64 dq (errors)": (*NF3, full, False),
        "optq3 g64 asym, H without first tokens": ("optq", {**OPTQ3, "sym": False}, rest, True),
    }
    for label in only or list(rows):
        q, cfg, stats, with_ppl = rows[label]
        run_row(st, res, "sink", label, q, cfg, stats, with_ppl=with_ppl)


def exp_full(st: Study, res: dict[str, Any]) -> None:
    """The baseline rows again, with the first-token / other-token split of the held-out error."""
    full = st.stats(st.args.n_calib, st.args.ctx)
    run_row(st, res, "sink", "nf3 b64 dq (errors)", *NF3, full, with_ppl=False)
    run_row(st, res, "sink", "optq3 g64 sym, full H", "optq", OPTQ3, full)


def exp_cap(st: Study, res: dict[str, Any]) -> None:
    """First tokens kept in H but capped at a share of its trace; and the asymmetric grid on the full H."""
    caps = [float(c) for c in st.args.caps.split(",") if c]
    for cap in caps:
        stats = st.capped_stats(st.args.n_calib, st.args.ctx, cap)
        run_row(st, res, "sink", f"optq3 g64 sym, first tokens <= {cap:g} of tr H", "optq", OPTQ3, stats)
    grid = "asym" if st.args.share_asym else "sym"
    for share in [float(c) for c in st.args.shares.split(",") if c]:
        stats = st.capped_stats(st.args.n_calib, st.args.ctx, share, exact=True)
        cfg = {**OPTQ3, "sym": not st.args.share_asym}
        run_row(st, res, "sink", f"optq3 g64 {grid}, first tokens = {share:g} of tr H", "optq", cfg, stats)
    if st.args.asym:
        full = st.stats(st.args.n_calib, st.args.ctx)
        run_row(st, res, "sink", "optq3 g64 asym, full H", "optq", {**OPTQ3, "sym": False}, full)


def exp_sinks(st: Study, res: dict[str, Any]) -> None:
    """Share of each layer's X^T X trace carried by the windows' first tokens (no quantization)."""
    batches = calibration_batches(st.tok, "causal-lm", "wikitext2", st.args.n_calib, length=st.args.ctx)
    calib = st._grams(f"calib-{st.args.n_calib}x{st.args.ctx}+0", batches)
    first = st._grams(f"calib-{st.args.n_calib}x{st.args.ctx}+0-first", _first_tokens(batches))
    st.held_out()
    share = {}
    for name in st.names:
        if name.split(".")[-1] in SHARED_INPUT:
            continue
        c, f = calib[name].hessian, first[name].hessian
        assert c is not None and f is not None
        share[name] = {
            "calib": float(f.diagonal().sum() / c.diagonal().sum()),
            "heldout": float(st._held_first[name].diagonal().sum() / st.held_out()[name].diagonal().sum()),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optq_smollm2_sinks.json").write_text(json.dumps(share, indent=1))
    for name, v in sorted(share.items(), key=lambda kv: -kv[1]["calib"])[:10]:
        print(f"{name:40s} calib {v['calib']:.3f} held-out {v['heldout']:.3f}")


def exp_variants(st: Study, res: dict[str, Any]) -> None:
    """OPTQ settings on the same fp Hessians (64 windows of 256 validation tokens), all layers."""
    stats = st.stats(st.args.n_calib, st.args.ctx)
    variants = {
        "optq3 g64 asym": {"bits": 3, "group_size": 64, "sym": False},
        "optq3 g32 sym": {"bits": 3, "group_size": 32},
        "optq3 g32 asym": {"bits": 3, "group_size": 32, "sym": False},
        "optq3 g64 sym act-order": {"bits": 3, "group_size": 64, "desc_act": True},
        "optq3 g64 sym damp0.1": {"bits": 3, "group_size": 64, "damp": 0.1},
        "optq3 g128 asym": {"bits": 3, "group_size": 128, "sym": False},
        "rtn-grid (identity H) g64 sym": {"bits": 3, "group_size": 64},
    }
    only = st.args.only.split(";") if st.args.only else list(variants)
    eye = {
        n: LayerStats(hessian=torch.eye(s.hessian.shape[0], dtype=torch.float64), n_tokens=1)  # type: ignore[union-attr]
        for n, s in stats.items()
    }
    for label in only:
        cfg = variants[label]
        run_row(st, res, "variants", label, "optq", cfg, eye if label.startswith("rtn-grid") else stats)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, choices=sorted(EXPERIMENTS))
    p.add_argument("--n-eval", type=int, default=8, help="evaluation windows of --ctx tokens (test split)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--n-calib", type=int, default=64, help="calibration windows of --ctx tokens (validation)")
    p.add_argument("--cache", default="/tmp/lqmod-optq-study")
    p.add_argument("--types", default="", help="by-type: comma-separated layer types (default all 7)")
    p.add_argument("--caps", default="", help="cap: comma-separated first-token trace share caps")
    p.add_argument("--shares", default="", help="cap: first-token trace shares to set exactly (up or down)")
    p.add_argument("--share-asym", action="store_true", help="cap: the --shares rows on the asymmetric grid")
    p.add_argument("--asym", action="store_true", help="cap: also the asymmetric grid on the full H")
    p.add_argument("--only", default="", help="variants: ';'-separated labels to run (default all)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the CPU is shared: one thread wastes less time in contention
    st = Study(args)
    res = load_results()
    EXPERIMENTS[args.exp](st, res)
    return 0


EXPERIMENTS = {
    "baseline": exp_baseline,
    "sink": exp_sink,
    "full": exp_full,
    "sinks": exp_sinks,
    "cap": exp_cap,
    "by-type": exp_by_type,
    "variants": exp_variants,
}

if __name__ == "__main__":
    raise SystemExit(main())
