"""Input statistics of linear layers: ``X^T X`` (the GPTQ/OPTQ Hessian, up to a factor 2/n)
and the mean absolute activation per input feature, gathered with forward hooks.

Each statistic is a sum over *real* tokens: positions where the batch's ``attention_mask``
is 0 (padding) are left out, so a padded batch gives the same statistics as its unpadded
sentences run one by one.

``skip_first=k`` also leaves out the first ``k`` real tokens of every sequence. A causal LM
makes the first token of a window an *attention sink* with massive activations: on
SmolLM2-135M the input of ``layers.11.mlp.down_proj`` at that one position carries 99.9% of
``X^T X``. Leaving it out is an experiment, not a recommendation: measured, OPTQ then lets the
sink's output error grow to 62% and perplexity explodes (``plugins/lqmod_optq/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.types import LayerStats

__all__ = ["HessianAccumulator", "collect_hessians", "input_features", "linear_module"]


def input_features(module: nn.Module) -> int:
    """in_features of a Linear, a transformers Conv1D (weight stored (in, out)) or a LoRALinear."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])
    in_features = getattr(module, "in_features", None)
    if isinstance(in_features, int):
        return in_features
    raise TypeError(
        f"{type(module).__name__} is not a linear layer: statistics are gathered for torch.nn.Linear, "
        "transformers' Conv1D and lqmod.LoRALinear"
    )


def linear_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name``, checked to be linear-like, with an error listing real names otherwise."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise ValueError(f"model has no module {name!r}; its linear layers include {linears}") from None
    try:
        input_features(module)
    except TypeError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return module


class HessianAccumulator:
    """Sums ``X^T X`` (float64), token counts and ``|X|`` per input feature of hooked modules.

    Use :meth:`attach` around forward passes; before each pass call :meth:`start_batch`
    with that pass's attention mask (or None), which also clears the per-pass cache that
    lets modules fed the very same tensor (q/k/v, gate/up) share one product.
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, skip_first: int = 0) -> None:
        if skip_first < 0:
            raise ValueError(f"skip_first must be >= 0 (tokens left out at the start of a sequence), got {skip_first}")
        self.skip_first = int(skip_first)
        self.modules = dict(modules)
        self.features = {n: input_features(m) for n, m in self.modules.items()}
        self.grams: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._mask: torch.Tensor | None = None
        self._cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = {}

    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        self._mask = None if attention_mask is None else attention_mask.bool()
        self._cache = {}

    def _skip_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """(batch, seq) bool: real tokens that are not among the first ``skip_first`` of their sequence."""
        if self.skip_first == 0 or x.ndim < 3:
            return None
        seq_shape = x.shape[:-1]
        mask = self._mask
        if mask is None or mask.shape != seq_shape:
            if mask is not None and not bool(mask.all()):
                return None  # _rows raises its own error for this misaligned, padded input
            mask = torch.ones(seq_shape, dtype=torch.bool)
        mask = mask.to(x.device)
        # Rank of each real token within its sequence (left padding is not counted).
        rank = mask.long().cumsum(dim=-1) - 1
        return mask & (rank >= self.skip_first)

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.features[name]:
            raise ValueError(
                f"{name}: input has {x.shape[-1]} features, the layer expects {self.features[name]}"
            )
        skip = self._skip_mask(x)
        if skip is not None:
            return x[skip]
        mask = self._mask
        if mask is None:
            return x.reshape(-1, x.shape[-1])
        if mask.shape == x.shape[:-1]:
            return x[mask.to(x.device)]
        if x.ndim == 2 and x.shape[0] == mask.shape[0]:
            # One vector per sequence (a pooler reading the first token): every row is real.
            return x
        if bool(mask.all()):
            return x.reshape(-1, x.shape[-1])
        raise ValueError(
            f"{name}: input of shape {tuple(x.shape)} does not line up with the attention mask "
            f"{tuple(mask.shape)}, so padding positions cannot be left out; calibrate with "
            "unpadded batches (e.g. lqmod.calibration.token_windows) for this model"
        )

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.detach()
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        cached = self._cache.get(key)
        if cached is None:
            rows = self._rows(name, x).float()
            # float32 products, float64 accumulation: a per-batch sum is exact enough and
            # float64 matmuls cost twice as much on CPU. The input is kept in the entry so its
            # memory cannot be freed and reused by a later input at the same address.
            cached = ((rows.T @ rows).double(), rows.abs().sum(0, dtype=torch.float64), rows.shape[0], x)
            self._cache[key] = cached
        gram, abs_sum, n, _ = cached
        if name in self.grams:
            self.grams[name] += gram.to(self.grams[name].device)
            self.abs_sums[name] += abs_sum.to(self.abs_sums[name].device)
        else:
            self.grams[name] = gram.clone()
            self.abs_sums[name] = abs_sum.clone()
        self.counts[name] += n

    @contextmanager
    def attach(self) -> Iterator[HessianAccumulator]:
        def make(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
                self.observe(name, args[0])

            return hook

        handles = [m.register_forward_hook(make(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._cache = {}

    def result(self) -> dict[str, LayerStats]:
        """Statistics of every module that saw at least one token."""
        out: dict[str, LayerStats] = {}
        for name in self.modules:
            n = self.counts[name]
            if name not in self.grams or n == 0:
                continue
            out[name] = LayerStats(
                hessian=self.grams[name],
                n_tokens=n,
                act_absmean=(self.abs_sums[name] / n).float(),
            )
        return out


def _batch_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) else None


def collect_hessians(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Mapping[str, Any]],
    *,
    progress: bool = True,
    skip_first: int = 0,
) -> dict[str, LayerStats]:
    """``X^T X`` of each named linear module's input over ``batches``, as :class:`LayerStats`.

    Each batch is the keyword arguments of one ``model(**batch)`` call. ``hessian`` is the
    float64 sum over real tokens (``attention_mask == 0`` positions excluded), ``n_tokens``
    the number of tokens summed and ``act_absmean`` the float32 mean ``|x|`` per input
    feature. Modules fed the same tensor in a pass share one product. ``skip_first`` leaves
    out the first real tokens of each sequence (attention sinks, module docstring). A module
    that saw no token is an error (the batches never reach it, or all positions are padding).
    """
    modules = {n: linear_module(model, n) for n in names}
    acc = HessianAccumulator(modules, skip_first=skip_first)
    with acc.attach(), torch.no_grad():
        for batch in tqdm(batches, desc="hessians", unit="batch", disable=not progress, leave=False):
            acc.start_batch(_batch_mask(batch))
            model(**batch)
    out = acc.result()
    unseen = [n for n in names if n not in out]
    if unseen:
        raise ValueError(
            f"no calibration token reached {len(unseen)} layer(s), e.g. {unseen[:3]}: give non-empty "
            "batches whose forward pass uses these layers"
        )
    return out
