"""The run's metrics log (one JSON object a line) and its loss-curve plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_loss_curve"]


class MetricsLog:
    """Append-only JSONL, flushed every line so a killed run keeps what it logged."""

    def __init__(self, path: Path, *, resume_step: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            # Lines past the resumed state were written by the interrupted run and will be
            # produced again; keep only what the state already accounts for.
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if int(row.get("step", 0)) <= resume_step:
                        self.rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        os.replace(tmp, path)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def plot_loss_curve(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """Training loss per step and held-out loss at each evaluation; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), lw=1.2, label="train loss")
    if held:
        ax.plot(*zip(*held, strict=True), "o-", lw=1.5, label="held-out loss")
        ax2 = ax.secondary_yaxis("right", functions=(_exp, _log))
        ax2.set_ylabel("held-out perplexity")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title or "lqmod finetuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _exp(x: Any) -> Any:
    import numpy as np

    return np.exp(np.clip(x, -50, 50))


def _log(x: Any) -> Any:
    import numpy as np

    return np.log(np.clip(x, 1e-12, None))
