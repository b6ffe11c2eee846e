"""Resumable training state: adapters, optimizer, scheduler and RNG, without pickle.

A state is a directory ``step-NNNNNN`` holding

* ``trainable.safetensors``: every trainable parameter, by its name in the model;
* ``optimizer.safetensors``: the optimizer's per-parameter tensors (``state.<i>.<key>``);
* ``rng.safetensors``: torch's CPU (and CUDA) generator states; in a data-parallel run also
  every process's CPU generator (``torch.rank<r>``), so each resumes with its own;
* ``state.json``: the step, the optimizer's param groups, the scheduler's and grad scaler's
  state, Python's ``random`` state and the run's fingerprint (config + data), so a resume
  with other settings or other data is refused instead of silently mixing two runs.

Each state is written through :func:`lqmod.io.atomic_dir`: an interrupted save leaves the
previous states as they were.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["TrainState", "latest_state", "load_state", "prune_states", "save_state"]

STATE_JSON = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainState:
    step: int
    fingerprint: str
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None = None
    tokens_seen: int = 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    rank_rng: list[torch.Tensor] | None = None,
) -> Path:
    """Write ``run_dir/states/step-NNNNNN`` atomically; return its path.

    ``rank_rng``: the CPU generator state of every process of a data-parallel run, by rank.
    """
    from lqmod.io import atomic_dir

    target = run_dir / "states" / f"step-{state.step:06d}"
    opt = optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    for r, s in enumerate(rank_rng or []):
        rng[f"torch.rank{r}"] = s.contiguous()
    py_version, py_internal, py_gauss = random.getstate()
    meta = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "fingerprint": state.fingerprint,
        "param_groups": _json_safe(opt["param_groups"]),
        "optimizer_scalars": _json_safe(opt_scalars),
        "param_names": list(_trainable(model)),
        "scheduler": _json_safe(state.scheduler),
        "scaler": _json_safe(state.scaler),
        "python_random": [py_version, list(py_internal), py_gauss],
    }
    with atomic_dir(target, overwrite=True) as tmp:
        params = {n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()}
        save_file(params, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return target


def latest_state(run_dir: Path) -> Path | None:
    """The newest complete state under ``run_dir/states`` (temporaries are ignored)."""
    root = run_dir / "states"
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_JSON).is_file()
    ]
    return max(found)[1] if found else None


def prune_states(run_dir: Path, keep: int) -> None:
    root = run_dir / "states"
    if not root.is_dir():
        return
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in found[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, rank: int = 0) -> TrainState:
    """Restore parameters, optimizer and RNG from a state directory; return the rest.

    ``rank``: which process of a data-parallel run this is; it gets its own saved generator
    state where the state has one (a run resumed on more processes than saved it gives the
    new ones rank 0's, offset by their rank).
    """
    meta = json.loads((path / STATE_JSON).read_text())
    params = _trainable(model)
    if list(params) != meta["param_names"]:
        saved, have = meta["param_names"], list(params)
        # Name the first difference: equal counts with other names (a renamed module) would
        # otherwise read as a contradiction.
        pairs = enumerate(zip(saved, have, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(saved), len(have)))
        was = saved[first] if first < len(saved) else "(none)"
        now = have[first] if first < len(have) else "(none)"
        raise ValueError(
            f"state {path} was saved for other trainable parameters ({len(saved)} named tensors, #{first} "
            f"{was!r}) than this model has ({len(have)}, #{first} {now!r}): resume from the same checkpoint "
            "and lqmod version, or start a new run directory"
        )
    stored = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(stored[name].to(p.device))
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        per_param.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["optimizer_scalars"].items():
        per_param.setdefault(int(idx), {}).update(scalars)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    rng = load_file(str(path / "rng.safetensors"))
    if f"torch.rank{rank}" in rng:
        torch.set_rng_state(rng[f"torch.rank{rank}"])
    else:
        torch.set_rng_state(rng["torch"])
        if rank:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + rank)
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return TrainState(
        step=int(meta["step"]),
        fingerprint=meta["fingerprint"],
        scheduler=meta["scheduler"],
        scaler=meta["scaler"],
        tokens_seen=int(meta.get("tokens_seen", 0)),
    )
