"""Input statistics of linear layers: ``X^T X`` (the GPTQ/OPTQ Hessian, up to a factor 2/n)
and the mean absolute activation per input feature, gathered with forward hooks.

Each statistic is a sum over *real* tokens: positions where the batch's ``attention_mask``
is 0 (padding) are left out, so a padded batch gives the same statistics as its unpadded
sentences run one by one.

``sink=SinkWeighting(tokens=k, share=s)`` re-weights the first ``k`` real tokens of every
sequence (a causal LM's attention sinks) so that they carry ``s`` of each layer's trace
(:mod:`lqmod.calibration.sinks` says why; ``s=0`` leaves them out, which ``skip_first=k``
is shorthand for). Measured on SmolLM2-135M, OPTQ-3 needs ``s=0.5`` to beat NF3; leaving the
sinks out makes perplexity explode (``plugins/lqmod_optq/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.calibration.sinks import SinkWeighting, reweight
from lqmod.types import LayerStats

__all__ = ["HessianAccumulator", "collect_hessians", "input_features", "linear_module", "resolve_sink"]


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


def resolve_sink(sink: SinkWeighting | None, skip_first: int) -> SinkWeighting | None:
    """One weighting from the ``sink`` / ``skip_first`` pair of arguments (``skip_first`` is shorthand)."""
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0 (tokens left out at the start of a sequence), got {skip_first}")
    if skip_first and sink is not None:
        raise ValueError(
            "give either skip_first or sink, not both (skip_first=k is sink=SinkWeighting(tokens=k, share=0))"
        )
    if skip_first:
        return SinkWeighting(tokens=skip_first, share=0.0)
    return sink


class HessianAccumulator:
    """Sums ``X^T X`` (float64), token counts and ``|X|`` per input feature of hooked modules.

    Use :meth:`attach` around forward passes; before each pass call :meth:`start_batch`
    with that pass's attention mask (or None), which also clears the per-pass cache that
    lets modules fed the very same tensor (q/k/v, gate/up) share one product. With a
    ``sink`` weighting the first tokens' product is summed apart and balanced in :meth:`result`.
    """

    def __init__(
        self, modules: Mapping[str, nn.Module], *, skip_first: int = 0, sink: SinkWeighting | None = None
    ) -> None:
        self.sink = resolve_sink(sink, skip_first)
        self.modules = dict(modules)
        self.features = {n: input_features(m) for n, m in self.modules.items()}
        self.grams: dict[str, torch.Tensor] = {}
        self.first_grams: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._mask: torch.Tensor | None = None
        self._cache: dict[tuple[Any, ...], _Entry] = {}

    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        self._mask = None if attention_mask is None else attention_mask.bool()
        self._cache = {}

    def _first_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(real, first): (batch, seq) bool masks of real tokens and of the sink tokens among them."""
        if self.sink is None or x.ndim < 3:
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
        return mask, mask & (rank < self.sink.tokens)

    def _rows(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The real tokens' rows and, with a sink weighting, which of them are sink tokens."""
        if x.shape[-1] != self.features[name]:
            raise ValueError(
                f"{name}: input has {x.shape[-1]} features, the layer expects {self.features[name]}"
            )
        split = self._first_mask(x)
        if split is not None:
            real, first = split
            return x[real], first[real]
        mask = self._mask
        if mask is None:
            return x.reshape(-1, x.shape[-1]), None
        if mask.shape == x.shape[:-1]:
            return x[mask.to(x.device)], None
        if x.ndim == 2 and x.shape[0] == mask.shape[0]:
            # One vector per sequence (a pooler reading the first token): every row is real.
            return x, None
        if bool(mask.all()):
            return x.reshape(-1, x.shape[-1]), None
        raise ValueError(
            f"{name}: input of shape {tuple(x.shape)} does not line up with the attention mask "
            f"{tuple(mask.shape)}, so padding positions cannot be left out; calibrate with "
            "unpadded batches (e.g. lqmod.calibration.token_windows) for this model"
        )

    def _entry(self, name: str, x: torch.Tensor) -> _Entry:
        rows, first = self._rows(name, x)
        rows = rows.float()
        first_gram: torch.Tensor | None = None
        if first is not None:
            sink_rows, rows_rest = rows[first], rows[~first]
            first_gram = (sink_rows.T @ sink_rows).double()
            if self.sink is not None and self.sink.drops:
                rows = rows_rest  # left out: neither counted nor in |x|
                first_gram = None
            gram = (rows_rest.T @ rows_rest).double()
        else:
            gram = (rows.T @ rows).double()
        # float32 products, float64 accumulation: a per-batch sum is exact enough and float64
        # matmuls cost twice as much on CPU. The input is kept in the entry so its memory
        # cannot be freed and reused by a later input at the same address.
        return _Entry(gram, first_gram, rows.abs().sum(0, dtype=torch.float64), rows.shape[0], x)

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.detach()
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._cache[key] = self._entry(name, x)
        _add(self.grams, name, entry.gram)
        _add(self.abs_sums, name, entry.abs_sum)
        if entry.first_gram is not None:
            _add(self.first_grams, name, entry.first_gram)
        self.counts[name] += entry.n

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
            hessian = self.grams[name]
            if self.sink is not None:
                hessian = reweight(hessian, self.first_grams.get(name), self.sink)
            out[name] = LayerStats(
                hessian=hessian,
                n_tokens=n,
                act_absmean=(self.abs_sums[name] / n).float(),
            )
        return out


class _Entry(NamedTuple):
    """One pass's products for one input tensor (shared by the modules it feeds)."""

    gram: torch.Tensor  # X^T X of the real tokens (the non-sink ones under a sink weighting)
    first_gram: torch.Tensor | None  # X^T X of the sink tokens, kept apart to be re-weighted
    abs_sum: torch.Tensor
    n: int
    x: torch.Tensor


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in sums:
        sums[name] += value.to(sums[name].device)
    else:
        sums[name] = value.clone()


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
    sink: SinkWeighting | None = None,
) -> dict[str, LayerStats]:
    """``X^T X`` of each named linear module's input over ``batches``, as :class:`LayerStats`.

    Each batch is the keyword arguments of one ``model(**batch)`` call. ``hessian`` is the
    float64 sum over real tokens (``attention_mask == 0`` positions excluded), ``n_tokens``
    the number of tokens summed and ``act_absmean`` the float32 mean ``|x|`` per input
    feature. Modules fed the same tensor in a pass share one product. ``sink`` re-weights the
    first real tokens of each sequence (attention sinks, module docstring) and ``skip_first=k``
    leaves them out. A module
    that saw no token is an error (the batches never reach it, or all positions are padding).
    """
    modules = {n: linear_module(model, n) for n in names}
    acc = HessianAccumulator(modules, skip_first=skip_first, sink=sink)
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
