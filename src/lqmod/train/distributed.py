"""Data parallelism for the finetuning loop over ``torch.distributed`` (torchrun, accelerate).

One process per device; every process holds the whole quantized model and trains the same
adapters on its share of each optimizer step's windows. The processes are started by
``torchrun`` (or ``accelerate launch``, which runs torchrun's machinery): this module reads
the environment they set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` ...),
initialises the process group (gloo on CPU, NCCL on CUDA) with a timeout, and reuses a
group that the caller (or accelerate) already initialised.

What a step computes does not depend on the number of processes: the config's
``micro_batch_size * grad_accum`` windows are the *global* batch; each of the ``N``
processes takes a contiguous ``1/N`` of them and runs it in micro-batches of
``micro_batch_size`` windows (so its accumulation count is ``grad_accum / N``), and every
loss is divided by the token count of the whole global batch (known to every process: the
windows of a step are a pure function of seed and step). So the all-reduced gradient is
that of one process running the whole batch, up to float summation order.

A process that dies makes the others fail instead of wait forever: a collective on a closed
connection raises at once, one on a stalled peer raises after ``timeout_s``
(:class:`DistributedError`, naming the rank, the step and the timeout), and torchrun's
agent ends the remaining workers as soon as one exits with an error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedError",
    "init_distributed",
    "rank_share",
    "wrap_ddp",
]

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "LQMOD_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A collective failed: another process died, stalled past the timeout, or diverged."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` where CUDA is available, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    def _comm_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        if self.distributed and dist.get_backend() == "nccl":
            return self.device()
        return torch.device("cpu")

    def fail(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: {what} failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); another process died, stalled for more than the "
            f"{self.timeout_s:g} s timeout ({TIMEOUT_ENV} / --dist-timeout), or ran different settings"
        )

    def all_reduce_sum(self, values: Sequence[float], *, what: str) -> list[float]:
        """Sums of ``values`` over every process (float64: the order of summation stays harmless)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        try:
            dist.all_reduce(t)
        except RuntimeError as exc:
            raise self.fail(what, exc) from exc
        return [float(v) for v in t.cpu()]

    def all_gather(self, tensor: torch.Tensor, *, what: str) -> list[torch.Tensor]:
        """Every process's ``tensor`` (same shape and dtype everywhere), in rank order, on the CPU."""
        if not self.distributed:
            return [tensor.cpu()]
        t = tensor.to(self._comm_device())
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        try:
            dist.all_gather(out, t)
        except RuntimeError as exc:
            raise self.fail(what, exc) from exc
        return [o.cpu() for o in out]

    def barrier(self, *, what: str) -> None:
        if not self.distributed:
            return
        try:
            dist.barrier()
        except RuntimeError as exc:
            raise self.fail(what, exc) from exc

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        value = timeout_s
    else:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds (e.g. 600)") from None
    if not value > 0:
        raise ValueError(f"the process-group timeout must be a positive number of seconds, got {value!r}")
    return value


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> DistContext:
    """The process group torchrun/accelerate describe in the environment, created if needed.

    Without ``WORLD_SIZE > 1`` in the environment and no group initialised, this is one
    process and nothing is set up. ``timeout_s`` (default ``$LQMOD_DIST_TIMEOUT`` or 600 s)
    bounds how long any collective waits for a stalled peer.
    """
    timeout = _timeout_s(timeout_s)
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistContext(dist.get_rank(), dist.get_world_size(), local, timeout, owns_group=False)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers (as torchrun sets them): {exc}") from None
    if world <= 1:
        return DistContext(timeout_s=timeout)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with "
            "torchrun --nproc-per-node N (or accelerate launch), which sets them"
        )
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen == "nccl":
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(chosen, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    return DistContext(rank, world, local, timeout, owns_group=True)


def rank_share(windows: Sequence[torch.Tensor], micro_batch_size: int, ctx: DistContext) -> list[torch.Tensor]:
    """This process's micro-batches of one step: a contiguous ``1/N`` of the step's windows.

    ``windows`` are the step's micro-batches as :func:`lqmod.train.step_windows` returns
    them; the share is cut again into micro-batches of ``micro_batch_size`` (the last may
    be smaller when the share is not a multiple of it).
    """
    flat = torch.cat(list(windows))
    n = int(flat.numel())
    if n % ctx.world_size:
        raise ValueError(
            f"the global batch of {n} windows (micro_batch_size x grad_accum) cannot be split evenly over "
            f"{ctx.world_size} processes: make micro_batch_size x grad_accum a multiple of {ctx.world_size}"
        )
    per = n // ctx.world_size
    mine = flat[ctx.rank * per : (ctx.rank + 1) * per]
    return list(mine.split(micro_batch_size))


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in DDP that synchronises only the trainable parameters (the adapters).

    Frozen parameters (embeddings, norms) and buffers (the quantized weights) are identical
    on every process by construction and never change: DDP is told to ignore them, so it
    neither broadcasts them at start nor before every forward (``broadcast_buffers=False``),
    and its gradient buckets hold only adapter gradients. The adapters themselves are
    broadcast from rank 0 once, so every process starts from the same ones.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device = next(p for p in model.parameters() if p.requires_grad).device
    # torch >= 2.13 renamed broadcast_buffers; the buffers are ignored above in either case.
    import inspect

    params = inspect.signature(DDP).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    kwargs: dict[str, Any] = {sync: False}
    try:
        return DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
            **kwargs,
        )
    except RuntimeError as exc:
        raise ctx.fail("setting up DistributedDataParallel (broadcast of the adapters)", exc) from exc


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """DDP's ``no_sync`` when ``skip`` (an accumulation micro-batch), else nothing."""
    sync_off = getattr(model, "no_sync", None)
    if skip and callable(sync_off):
        with sync_off():
            yield
    else:
        yield
