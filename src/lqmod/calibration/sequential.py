"""GPTQ-style sequential quantization: block by block, each calibrated on quantized inputs.

The transformer blocks (the ``nn.ModuleList`` holding the target linears: BERT's
``encoder.layer``, Llama's ``model.layers``, GPT-2's ``transformer.h``) are run one at a
time on stored inputs. Block 0's inputs (positional and keyword arguments: attention mask,
rotary position embeddings ...) are captured by a pre-hook that stops the forward pass.
Within a block, layers are quantized in *stages* in the order the forward pass reaches
them: a stage is the first not-yet-quantized layer together with the layers fed the very
same tensor (q/k/v, gate/up); its Hessians are gathered on the block's current inputs with
every earlier stage already quantized, then it is quantized (GPTQ's "true sequential"
order). So each Hessian is ``X^T X`` of exactly the input the final quantized model feeds
that layer. The quantized block is then re-run to produce the next block's inputs; only
one block's inputs are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.calibration.cache import StatsCache
from lqmod.calibration.hessian import HessianAccumulator, collect_hessians, resolve_sink
from lqmod.calibration.sinks import SinkWeighting
from lqmod.config import LoRAConfig, Plan, TargetConfig
from lqmod.model import LayerQuantizer, QuantizeReport
from lqmod.plugins import Registry
from lqmod.quantize import QuantizationError
from lqmod.types import LayerStats

__all__ = ["find_blocks", "quantize_model_sequential"]

BlockInput = tuple[tuple[Any, ...], dict[str, Any]]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (everything needed was seen)."""


def find_blocks(model: nn.Module, names: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` whose items hold the most of ``names`` (outermost on a tie), or None."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{list_name}." if list_name else ""
        count = sum(1 for n in names if n.startswith(prefix) and n[len(prefix) :].split(".", 1)[0].isdigit())
        if count and (best is None or count > best[2]):
            best = (list_name, module, count)
    return None if best is None else (best[0], best[1])


def _block_of(name: str, prefix: str, n_blocks: int) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < n_blocks else None


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no KV cache while calibrating; both restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            config.use_cache = use_cache  # type: ignore[union-attr]


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Mapping[str, Any]]) -> list[BlockInput]:
    captured: list[BlockInput] = []

    def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch)
            except _Stop:
                continue
            raise RuntimeError("the forward pass finished without reaching the first transformer block")
    finally:
        handle.remove()
    return captured


def _reached_before(model: nn.Module, block: nn.Module, names: Sequence[str], batch: Mapping[str, Any]) -> list[str]:
    """Which of ``names`` the forward pass runs before it enters ``block``."""
    if not names:
        return []
    reached: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _a, _o, _n=n: reached.append(_n)) for n in names
    ]
    try:
        _capture_block_inputs(model, block, [batch])
    finally:
        for h in handles:
            h.remove()
    return [n for n in names if n in reached]


def _with_hidden(inputs: BlockInput, hidden: torch.Tensor) -> BlockInput:
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block: nn.Module, inputs: BlockInput) -> torch.Tensor:
    args, kwargs = inputs
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, tuple | list) else out
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(f"a transformer block returned {type(out).__name__}, not hidden states")
    return hidden


def _stages(block: nn.Module, members: Mapping[str, str], first: BlockInput) -> list[list[str]]:
    """Layers of one block grouped by the order the forward pass reaches them (see module docstring).

    ``members`` maps a full layer name to its name inside the block.
    """
    seen: list[tuple[str, tuple[Any, ...]]] = []
    keep: list[torch.Tensor] = []  # holds inputs so their addresses stay unique during the pass

    def make(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0]
            if all(n != name for n, _ in seen):
                keep.append(x)
                seen.append((name, (x.data_ptr(), tuple(x.shape), tuple(x.stride()))))

        return hook

    handles = [block.get_submodule(local).register_forward_hook(make(full)) for full, local in members.items()]
    try:
        _run_block(block, first)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    done: set[str] = set()
    for name, key in seen:
        if name in done:
            continue
        stage = [n for n, k in seen if k == key and n not in done]
        done.update(stage)
        stages.append(stage)
    never = [n for n in members if n not in done]
    if never:
        stages.append(never)  # not reached by the forward pass: quantized last, without statistics
    return stages


def _gather(
    block: nn.Module,
    members: Mapping[str, str],
    names: Sequence[str],
    inputs: Sequence[BlockInput],
    masks: Sequence[torch.Tensor | None],
    last: str,
    sink: SinkWeighting | None = None,
) -> dict[str, LayerStats]:
    acc = HessianAccumulator({n: block.get_submodule(members[n]) for n in names}, sink=sink)

    def stop(_m: nn.Module, _a: tuple[Any, ...], _o: Any) -> None:
        raise _Stop

    with acc.attach():
        # Registered after the accumulator's hooks, so it fires after the last layer was observed.
        handle = block.get_submodule(members[last]).register_forward_hook(stop)
        try:
            for inp, mask in zip(inputs, masks, strict=True):
                acc.start_batch(mask)
                with suppress(_Stop):
                    _run_block(block, inp)
        finally:
            handle.remove()
    return acc.result()


def _cache_key(
    cache: StatsCache,
    model: nn.Module,
    lq: LayerQuantizer,
    batches: Sequence[Mapping[str, Any]],
    seed: int,
    sink: SinkWeighting | None = None,
) -> str:
    plan = {n: {"quantizer": e.quantizer, "config": e.config} for n, e in lq.entries.items()}
    extra: dict[str, Any] = sink.cache_extra() if sink is not None else {}  # old keys stay valid
    return cache.key(
        model, list(lq.entries), batches, "hessian-sequential", plan=plan, lora=lq.lora_cfg.model_dump(), seed=seed,
        **extra,
    )


def quantize_model_sequential(
    model: nn.Module,
    quantizer: str | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    batches: Sequence[Mapping[str, Any]],
    lora: LoRAConfig | Mapping[str, Any] | None = None,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    seed: int = 0,
    progress: bool = True,
    cache: StatsCache | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    skip_first: int = 0,
    sink: SinkWeighting | None = None,
) -> QuantizeReport:
    """Quantize ``model`` in place block by block, each block's Hessians taken on quantized inputs.

    Arguments as :func:`lqmod.model.quantize_model`; ``batches`` are the calibration forward
    calls' keyword arguments (``attention_mask`` positions 0 are left out of the Hessians).
    Hessians are gathered only for layers whose quantizer needs ``"hessian"``. A Fisher is a
    property of the unquantized model, not sequential: compute it with
    :func:`lqmod.calibration.diagonal_fisher` and pass it in ``stats`` (merged with the
    sequential Hessians). Targets outside the block list are quantized last, on Hessians of
    a normal pass through the then-quantized model. With ``cache``, the Hessians and the
    quantization order are stored, and a later identical call (same weights, text, plan,
    LoRA config, seed) reuses them without any forward pass. ``sink`` re-weights the first
    tokens of every sequence in the Hessians and ``skip_first=k`` leaves them out (attention
    sinks: see :mod:`lqmod.calibration.sinks`). Returns the same report as ``quantize_model``, layers in
    module order.
    """
    sink = resolve_sink(sink, skip_first)
    lq = LayerQuantizer(model, quantizer, config, lora=lora, targets=targets, plan=plan, registry=registry, seed=seed)
    batches = list(batches)
    if not batches:
        raise ValueError("quantize_model_sequential needs at least one calibration batch")
    given = dict(stats or {})
    for name in lq.entries:
        missing = sorted(lq.needs(name) - {"hessian"})
        if any(getattr(given.get(name), m, None) is None for m in missing):
            raise QuantizationError(
                f"layer {name!r}: quantizer {lq.specs[name].name!r} needs {missing}, which sequential calibration "
                "does not compute (a Fisher is taken on the unquantized model, not block by block): compute it "
                "with lqmod.calibration.diagonal_fisher(model, names, batches) and pass "
                "stats=lqmod.calibration.fisher_stats(fisher) to quantize_model_sequential or quantize_model"
            )
    key = _cache_key(cache, model, lq, batches, seed, sink) if cache is not None else None
    cached = cache.load(key) if cache is not None and key is not None else None
    manifest = cache.manifest(key) if cached is not None and cache is not None and key is not None else None
    # Layers are swapped in as the blocks go (later blocks must see the quantized outputs),
    # so a failure part-way undoes every swap: the model is never left half converted.
    try:
        lq.freeze()
        same_layers = manifest is not None and sorted(manifest["meta"].get("order", [])) == sorted(lq.entries)
        if cached is not None and same_layers:
            order = list(manifest["meta"]["order"])  # type: ignore[index]
            reports = {
                name: lq.quantize(name, _merge(given.get(name), cached.get(name)))
                for name in tqdm(order, desc="quantizing (cached)", unit="layer", disable=not progress)
            }
        else:
            reports, gathered, order = _sequential(
                model, lq, batches, given, keep=cache is not None, progress=progress, sink=sink
            )
            if cache is not None and key is not None:
                cache.save(key, gathered, meta={"kind": "hessian-sequential", "order": order})
    except BaseException:
        lq.rollback()
        raise
    report = QuantizeReport()
    report.layers = [reports[n] for n in lq.entries]
    return report


def _merge(given: LayerStats | None, hessian: LayerStats | None) -> LayerStats | None:
    """Supplied statistics (e.g. a Fisher) with the sequentially gathered Hessian fields on top."""
    if hessian is None:
        return given
    if given is None:
        return hessian
    return LayerStats(hessian.hessian, hessian.n_tokens, given.fisher, hessian.act_absmean)


def _sequential(
    model: nn.Module,
    lq: LayerQuantizer,
    batches: Sequence[Mapping[str, Any]],
    given: Mapping[str, LayerStats],
    *,
    keep: bool,
    progress: bool,
    sink: SinkWeighting | None = None,
    block_scope: Callable[[int, nn.Module], AbstractContextManager[Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, LayerStats], list[str]]:
    """The block loop: (reports by name, gathered Hessian stats if ``keep``, quantization order).

    ``block_scope(k, block)``, if given, is entered around all the work on block ``k``: the
    streamed quantizer (:mod:`lqmod.streaming`) loads the block's weights on entry and
    writes and frees it on exit.
    """
    names = list(lq.entries)
    found = find_blocks(model, names)
    if found is None:
        raise ValueError(
            "no nn.ModuleList of transformer blocks holds the target layers, so the model cannot be quantized "
            "block by block; use lqmod.model.quantize_model with stats from lqmod.calibration.collect_hessians"
        )
    list_name, blocks = found
    prefix = f"{list_name}." if list_name else ""
    per_block: dict[int, dict[str, str]] = {}
    outside: list[str] = []
    for name in names:
        k = _block_of(name, prefix, len(blocks))
        if k is None:
            outside.append(name)
        else:
            per_block.setdefault(k, {})[name] = name[len(prefix) + len(str(k)) + 1 :]
    masks = [b.get("attention_mask") if isinstance(b.get("attention_mask"), torch.Tensor) else None for b in batches]
    reports: dict[str, Any] = {}
    gathered: dict[str, LayerStats] = {}
    order: list[str] = []
    needs_h = {n for n in names if "hessian" in lq.needs(n)}
    bar = tqdm(total=len(names), desc="quantizing (sequential)", unit="layer", disable=not progress)

    def quantize(name: str) -> None:
        reports[name] = lq.quantize(name, _merge(given.get(name), gathered.get(name)))
        if not keep:
            gathered.pop(name, None)  # a Hessian is needed once; hold at most one stage's
        order.append(name)
        bar.update(1)

    def outside_pass(which: list[str]) -> None:
        want = [n for n in which if n in needs_h]
        if want:
            gathered.update(collect_hessians(model, want, batches, progress=False, sink=sink))
        for name in which:
            quantize(name)

    with _calibration_mode(model):
        # Targets the forward pass reaches before the first block (an input projection) are
        # quantized first, so the blocks are calibrated on what they will really receive.
        before = _reached_before(model, blocks[0], outside, batches[0])
        outside = [n for n in outside if n not in before]
        outside_pass(before)
        inputs = _capture_block_inputs(model, blocks[0], batches)
        last = max(per_block, default=-1)
        for k in range(last + 1):
            block = blocks[k]
            members = per_block.get(k, {})
            with block_scope(k, block) if block_scope is not None else nullcontext():
                if members and needs_h & set(members):
                    for stage in _stages(block, members, inputs[0]):
                        want = [n for n in stage if n in needs_h]
                        if want:
                            gathered.update(
                                _gather(block, members, want, inputs, masks, last=want[-1], sink=sink)
                            )
                        for name in sorted(stage, key=names.index):
                            quantize(name)
                else:
                    for name in members:
                        quantize(name)
                if k < last or outside:
                    inputs = [_with_hidden(inp, _run_block(block, inp)) for inp in inputs]
        del inputs
        outside_pass(outside)
    bar.close()
    return reports, gathered, order
