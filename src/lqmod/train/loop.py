"""The causal-LM finetuning loop: packed windows, AdamW on the adapters, warmup + decay,
accumulation, clipping, autocast, gradient checkpointing, evaluation, resumable state.

The loop shares transformers' conventions (its schedulers; labels ``-100`` not scored;
``gradient_checkpointing_enable``) so a run here and one under ``transformers.Trainer``
are the same computation. Which windows a step sees is a pure function of the seed and the
step, so a resumed run replays exactly the batches the interrupted one would have seen.

Under ``torchrun``/``accelerate launch`` the same function trains data-parallel: DDP over
the adapters only, each process on its share of every step, one global loss normalisation,
metrics and states written by rank 0 (see :mod:`lqmod.train.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.evaluation.perplexity import token_nll, windows_loss
from lqmod.train.config import FinetuneConfig
from lqmod.train.data import PackedData
from lqmod.train.distributed import DistContext, init_distributed, no_sync, rank_share, wrap_ddp
from lqmod.train.metrics import MetricsLog, plot_loss_curve
from lqmod.train.state import TrainState, latest_state, load_state, prune_states, save_state

__all__ = ["FinetuneResult", "StepInfo", "autocast_dtype", "step_windows", "train_causal_lm"]


@dataclass(frozen=True)
class StepInfo:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int


@dataclass
class FinetuneResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_s: float = math.nan
    run_dir: Path | None = None
    resumed_from: int | None = None
    world_size: int = 1

    @property
    def eval_before(self) -> dict[str, Any] | None:
        return self.evals[0] if self.evals else None

    @property
    def eval_after(self) -> dict[str, Any] | None:
        return self.evals[-1] if self.evals else None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device (it trains with a loss scaler); use 'bf16' or 'fp32'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def step_windows(step: int, n_windows: int, cfg: FinetuneConfig) -> list[torch.Tensor]:
    """Indices of the windows of each micro-batch of optimizer step ``step`` (0-based).

    Windows are read in a seed-determined permutation per epoch; one step takes the next
    ``micro_batch_size * grad_accum`` of them, crossing into the next epoch if needed.
    """
    per_step = cfg.batch_windows
    flat = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_windows)
        flat.append(int(_permutation(cfg.seed, epoch, n_windows)[pos]))
    idx = torch.tensor(flat)
    return list(idx.split(cfg.micro_batch_size))


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    key = (seed, epoch, n)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=gen)
    return _PERM_CACHE[key]


def _fingerprint(cfg: FinetuneConfig, train: PackedData, params: Sequence[str]) -> str:
    h = hashlib.sha256()
    # The number of states kept and how often to log or save do not change the result.
    # Neither does the number of processes nor their timeout (a run may resume on another N).
    skip = {"keep_states", "save_every", "log_every", "eval_every", "eval_batch_size", "dist_timeout_s"}
    keep = cfg.model_dump(exclude=skip)
    h.update(json.dumps(keep, sort_keys=True).encode())
    h.update(train.input_ids.numpy().tobytes())
    h.update(train.labels.numpy().tobytes())
    h.update("\n".join(params).encode())
    return h.hexdigest()


def _scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    sched: torch.optim.lr_scheduler.LRScheduler = get_scheduler(
        name, opt, num_warmup_steps=cfg.n_warmup, num_training_steps=cfg.steps
    )
    return sched


def _gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    if not enabled:
        return
    # Non-reentrant checkpointing recomputes through the materialize-in-backward function
    # and needs no input that requires grad (the embeddings are frozen). transformers 5
    # renamed the method; older releases only have the first name.
    kwargs = {"use_reentrant": False}
    hf: Any = model
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(hf, "gradient_checkpointing_enable"):
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            "gradient checkpointing needs a transformers model (with gradient_checkpointing_enable), "
            f"got {type(model).__name__}"
        )
    if getattr(hf, "config", None) is not None:
        hf.config.use_cache = False


def _evaluate(
    model: nn.Module, data: PackedData, cfg: FinetuneConfig, dtype: torch.dtype | None, ctx: DistContext
) -> dict[str, Any]:
    device = next(model.parameters()).device
    # Each process scores a contiguous share of the windows; the sums are all-reduced.
    lo, hi = (len(data) * ctx.rank) // ctx.world_size, (len(data) * (ctx.rank + 1)) // ctx.world_size
    total, count = 0.0, 0
    if hi > lo:
        with _autocast(device, dtype):
            res = windows_loss(model, data.input_ids[lo:hi], data.labels[lo:hi], batch_size=cfg.eval_batch_size)
        total, count = res.nll * res.tokens, res.tokens
    total, n = ctx.all_reduce_sum([total, count], what="the held-out evaluation")
    nll = total / max(n, 1)
    return {"eval_loss": nll, "eval_ppl": math.exp(nll) if n else math.nan, "eval_tokens": int(n)}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _log(run_dir: Path | None, resume_step: int | None, main: bool) -> Iterator[MetricsLog | None]:
    if run_dir is None or not main:
        yield None
        return
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step)
    try:
        yield log
    finally:
        log.close()


def train_causal_lm(
    model: nn.Module,
    train: PackedData,
    cfg: FinetuneConfig | None = None,
    *,
    eval_data: PackedData | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    dist_ctx: DistContext | None = None,
) -> FinetuneResult:
    """Train the trainable parameters of ``model`` (its adapters) on packed windows.

    With ``run_dir`` the run writes ``metrics.jsonl``, ``loss_curve.png`` and resumable
    states (``states/step-NNNNNN``, every ``cfg.save_every`` steps and at the end);
    ``resume=True`` continues from the newest state there and reaches the same parameters
    as an uninterrupted run. The model comes back in eval mode.

    Started by ``torchrun`` (``WORLD_SIZE > 1``; or with an initialised process group, or
    ``dist_ctx``), it trains data-parallel: the same global batch, split over the
    processes; every process returns the same adapters, and rank 0 alone writes the run
    directory (its result holds the complete loss history on a resume).
    """
    cfg = cfg or FinetuneConfig()
    if train.seq_len != cfg.seq_len:
        raise ValueError(f"training windows have {train.seq_len} tokens, the config says seq_len={cfg.seq_len}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters: quantize it with lqmod (adapters train) first")
    run = Path(run_dir) if run_dir is not None else None
    if resume and run is None:
        raise ValueError("resume=True needs the run_dir of the interrupted run")
    ctx = dist_ctx if dist_ctx is not None else init_distributed(cfg.dist_timeout_s)
    if cfg.batch_windows % ctx.world_size:
        raise ValueError(
            f"the global batch of micro_batch_size x grad_accum = {cfg.batch_windows} windows cannot be split "
            f"evenly over {ctx.world_size} processes: make it a multiple of {ctx.world_size}"
        )
    device = next(model.parameters()).device
    dtype = autocast_dtype(cfg.precision, device)
    _gradient_checkpointing(model, cfg.gradient_checkpointing)

    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    fingerprint = _fingerprint(cfg, train, [n for n, _ in named])
    start, tokens_seen, resumed = 0, 0, None
    if resume and run is not None and (path := latest_state(run)) is not None:
        st = load_state(path, model, opt, rank=ctx.rank)
        if st.fingerprint != fingerprint:
            raise ValueError(
                f"cannot resume from {path}: it was saved by a run with another config, training data "
                "or set of trainable parameters (give the same settings, or a new run directory)"
            )
        sched.load_state_dict(st.scheduler)
        if scaler is not None and st.scaler:
            scaler.load_state_dict(st.scaler)
        start, tokens_seen, resumed = st.step, st.tokens_seen, st.step
    else:
        # Dropout masks differ between processes, as they would between micro-batches.
        torch.manual_seed(cfg.seed + ctx.rank)
    # After the resume: DDP broadcasts rank 0's adapters, so all processes start alike.
    net = wrap_ddp(model, ctx) if ctx.distributed else model

    result = FinetuneResult(steps=cfg.steps, run_dir=run, resumed_from=resumed, world_size=ctx.world_size)
    with _log(run, resumed, ctx.is_main) as log:
        if log is not None:
            result.losses = [r["loss"] for r in log.rows if "loss" in r]
            result.evals = [r for r in log.rows if "eval_loss" in r]
        if eval_data is not None and start == 0:
            row = {"step": 0, **_evaluate(model, eval_data, cfg, dtype, ctx)}
            result.evals.append(row)
            if log:
                log.write(row)
        model.train()
        t0, tokens_run = time.perf_counter(), 0
        bar = tqdm(total=cfg.steps, initial=start, desc="finetuning", unit="step",
                   disable=not (progress and ctx.is_main))
        for step in range(start, cfg.steps):
            micro = step_windows(step, len(train), cfg)
            # Every process knows the whole step's windows, so the global count needs no collective.
            n_scored = sum(int((train.labels[i][:, 1:] != -100).sum()) for i in micro)
            mine = rank_share(micro, cfg.micro_batch_size, ctx) if ctx.distributed else micro
            loss_sum = 0.0
            for k, idx in enumerate(mine):
                x, y = train.input_ids[idx].to(device), train.labels[idx].to(device)
                last = k == len(mine) - 1
                with no_sync(net, skip=not last):
                    with _autocast(device, dtype):
                        nll, _ = token_nll(net, x, y)
                    # Dividing by the whole step's token count makes k micro-batches one batch; DDP
                    # averages over the N processes, so each scales by N to leave a sum.
                    loss = nll / max(n_scored, 1)
                    scaled = loss * ctx.world_size if ctx.distributed else loss
                    try:
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    except RuntimeError as exc:
                        if ctx.distributed and last:
                            raise ctx.fail(f"the gradient all-reduce of step {step + 1}", exc) from exc
                        raise
                loss_sum += float(loss.detach())
            if ctx.distributed:
                (loss_sum,) = ctx.all_reduce_sum([loss_sum], what=f"the loss all-reduce of step {step + 1}")
            if scaler is not None:
                scaler.unscale_(opt)
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip is not None else math.inf)
            )
            lr = float(opt.param_groups[0]["lr"])
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            tokens_seen += cfg.tokens_per_step
            tokens_run += cfg.tokens_per_step
            tps = tokens_run / max(time.perf_counter() - t0, 1e-9)
            result.losses.append(loss_sum)
            info = StepInfo(done, loss_sum, lr, grad_norm, tokens_seen)
            if log and (done % cfg.log_every == 0 or done == cfg.steps):
                log.write({"step": done, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                           "tokens": tokens_seen, "tokens_per_s": tps})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            if eval_data is not None and (done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                row = {"step": done, **_evaluate(model, eval_data, cfg, dtype, ctx)}
                result.evals.append(row)
                if ctx.is_main:
                    bar.write(f"step {done}: held-out loss {row['eval_loss']:.4f}, perplexity {row['eval_ppl']:.2f}")
                if log:
                    log.write(row)
                    plot_loss_curve(log.rows, run / "loss_curve.png")  # type: ignore[operator]
            if run is not None and (done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0)):
                scaler_state = scaler.state_dict() if scaler is not None else None
                state = TrainState(done, fingerprint, sched.state_dict(), scaler_state, tokens_seen)
                # Each process's RNG goes into rank 0's state, so a resume restores every one.
                rngs = ctx.all_gather(torch.get_rng_state(), what=f"gathering RNG states at step {done}")
                if ctx.is_main:
                    save_state(run, model, opt, state, rank_rng=rngs if ctx.distributed else None)
                    prune_states(run, cfg.keep_states)
                ctx.barrier(what=f"waiting for rank 0 to save the state of step {done}")
            for cb in callbacks:
                cb(info)
        bar.close()
        result.tokens_per_s = tokens_run / max(time.perf_counter() - t0, 1e-9) if tokens_run else math.nan
        if log and run is not None:
            plot_loss_curve(log.rows, run / "loss_curve.png")
    model.eval()
    return result
