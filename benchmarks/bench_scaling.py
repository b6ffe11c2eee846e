"""Scaling on CPU: peak memory of streamed vs in-memory quantization, and finetuning tokens/s
on 1 vs 2 processes (torchrun, gloo).

    python benchmarks/bench_scaling.py [--work DIR] [--skip-smollm2] [--skip-train]

Every measurement runs in a fresh process (a peak is a property of a whole process): the
quantizations through ``python -m lqmod.bench.peak_rss``, the finetuning through ``lqmod
finetune`` (1 process) and ``torchrun --nproc-per-node 2 -m lqmod finetune``. The load
average is recorded before and after each one (the machine is shared). Writes
``benchmarks/results/scaling_cpu.json`` and ``scaling_cpu.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cached(work: Path, key: str, value: str) -> dict[str, Any] | None:
    """A row this benchmark measured before in ``work`` (rows.jsonl), so an interrupted run resumes."""
    path = work / "rows.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        row: dict[str, Any] = json.loads(line)
        if row.get(key) == value:
            return row
    return None


def _record(work: Path, row: dict[str, Any]) -> None:
    with (work / "rows.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _probe(model_dir: Path, out: Path, mode: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lqmod.bench.peak_rss", str(model_dir), str(out), "--mode", mode, *extra]
    before = _load()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(1), timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update({"command": " ".join(cmd[1:]), "load_before": before, "load_after": _load()})
    print(json.dumps(row), flush=True)
    return row


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def quantization_rows(work: Path, smollm2: bool) -> list[dict[str, Any]]:
    from lqmod.bench.synthetic import SyntheticLlama, write_synthetic_llama

    rows: list[dict[str, Any]] = []
    spec = SyntheticLlama()  # 111M params, 424 MiB float32
    syn = work / "synthetic"
    if not (syn / "model.safetensors.index.json").exists():
        write_synthetic_llama(syn, spec)
    cases: list[tuple[str, Path, list[str]]] = [
        ("synthetic-111M NF4", syn, ["--config", "bits=4,blocksize=64"]),
        ("synthetic-111M NF4 sequential (4 x 128 calibration tokens)", syn,
         ["--config", "bits=4,blocksize=64", "--sequential", "--n-calib", "4", "--calib-seq-len", "128"]),
    ]
    if smollm2:
        cases.append(("SmolLM2-135M NF3", _smollm2_dir(work), ["--config", "bits=3,blocksize=64"]))
    for label, src, extra in cases:
        for mode in ("stream", "memory"):
            row = _cached(work, "key", f"{label}/{mode}")
            if row is None:
                row = _probe(src, work / f"q-{mode}", mode, extra)
                row.update({"model": label, "fp32_mib": _dir_mib(src), "key": f"{label}/{mode}"})
                if mode == "memory":
                    a, b = (work / "q-stream"), (work / "q-memory")
                    row["streamed_checkpoint_identical"] = all(
                        (a / f).read_bytes() == (b / f).read_bytes() for f in ("model.safetensors", "lqmod.json")
                    )
                _record(work, row)
            rows.append(row)
    return rows


def _smollm2_dir(work: Path) -> Path:
    """SmolLM2-135M as a float32 safetensors directory (it ships as GGUF: converted once)."""
    out = work / "smollm2-fp32"
    if not (out / "config.json").exists():
        from safetensors.torch import save_file

        from lqmod.hf import load_local_model

        model, tokenizer, _ = load_local_model("smollm2")
        # transformers will not save a model it dequantized from GGUF: write the float32 tensors
        # (the tied head once) and a config without the GGUF quantization record.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        config.architectures = [type(model).__name__]  # how load_local_model tells a causal LM
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def train_rows(work: Path) -> list[dict[str, Any]]:
    """lqmod finetune of the SmolLM2 NF3 checkpoint: 1 process (1 and 2 threads) vs 2 processes x 1 thread."""
    ckpt = work / "smollm2-nf3"
    if not (ckpt / "lqmod.json").exists():
        src = _smollm2_dir(work)
        subprocess.run([sys.executable, "-m", "lqmod", "quantize", str(src), "--stream", "--config",
                        "bits=3,blocksize=64", "--rank", "8", "--out", str(ckpt), "--overwrite"],
                       check=True, env=_env(2), capture_output=True, text=True)
    common = ["finetune", str(ckpt), "--base", str(_smollm2_dir(work)), "--train", "wikitext2-valid", "--eval", "none",
              "--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "128", "--warmup", "0",
              "--no-progress", "--overwrite"]
    # 1 process x 2 threads is left out: on this shared, overloaded machine its OpenMP threads
    # contend (measured: 1.4 tokens/s for its first step, against 20 for 1 x 1).
    runs = [
        ("1 process x 1 thread", 1, [sys.executable, "-m", "lqmod"]),
        ("2 processes x 1 thread (torchrun, gloo)", 1,
         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lqmod"]),
    ]
    rows = []
    for label, threads, launcher in runs:
        cached = _cached(work, "run", label)
        if cached is not None:
            rows.append(cached)
            continue
        out = work / f"ft-{threads}-{len(launcher)}"
        cmd = [*launcher, *common, "--out", str(out)]
        before, t0 = _load(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=3600)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        found = re.search(r"([\d.]+) tokens/s", proc.stdout)
        log = out.with_name(out.name + ".run") / "metrics.jsonl"
        metrics = [json.loads(ln) for ln in log.read_text().splitlines()]
        steps = [m for m in metrics if "loss" in m]
        row = {"run": label, "threads_per_process": threads, "tokens_per_step": 512, "steps": len(steps),
               "tokens_per_s": float(found.group(1)) if found else None,
               "losses": [m["loss"] for m in steps], "wall_s": wall, "command": " ".join(cmd[1:]),
               "load_before": before, "load_after": _load()}
        print(json.dumps(row), flush=True)
        _record(work, row)
        rows.append(row)
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = result["quantization"]
    t = result["training"]
    fig, axes = plt.subplots(1, 2 if t else 1, figsize=(12 if t else 7, 4.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    labels = sorted({r["model"] for r in q}, key=[r["model"] for r in q].index)
    x = range(len(labels))
    for k, (mode, color) in enumerate((("stream", "tab:green"), ("memory", "tab:red"))):
        vals = [next(r["step_mib"] for r in q if r["model"] == lab and r["mode"] == mode) for lab in labels]
        ax.bar([i + (k - 0.5) * 0.38 for i in x], vals, 0.38, label=f"{mode}", color=color)
    fp32 = [next((r["fp32_mib"] for r in q if r["model"] == lab and r["fp32_mib"]), 0) for lab in labels]
    ax.scatter([i for i in x if fp32[i]], [f for f in fp32 if f], marker="_", s=900, color="k", label="fp32 weights")
    ax.set_xticks(list(x), [lab.replace(" (", "\n(") for lab in labels], fontsize=7)
    ax.set_ylabel("peak RSS added by the quantize step (MiB)")
    ax.set_title("streamed vs in-memory quantization (CPU)")
    ax.legend(fontsize=8)
    if t:
        ax = axes[0][1]
        ax.bar(range(len(t)), [r["tokens_per_s"] or 0 for r in t], color="tab:blue")
        ax.set_xticks(range(len(t)), [r["run"].replace(" (", "\n(") for r in t], fontsize=7)
        ax.set_ylabel("training tokens/s")
        load = f"{t[0]['load_before'][0]}-{t[-1]['load_after'][0]}"
        ax.set_title(f"SmolLM2 NF3 finetuning, 512 tokens/step (load average {load})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="/tmp/lqmod-bench-scaling")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "load_start": _load(),
        "threads_note": "quantizations run with OMP_NUM_THREADS=1; the machine has 2 cores shared with other jobs",
    }
    result["quantization"] = quantization_rows(work, not args.skip_smollm2)
    result["training"] = [] if args.skip_train or args.skip_smollm2 else train_rows(work)
    result["load_end"] = _load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling_cpu.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "scaling_cpu.png")
    print(f"wrote {RESULTS / 'scaling_cpu.json'} and scaling_cpu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
