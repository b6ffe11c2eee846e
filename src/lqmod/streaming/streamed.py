"""Streamed quantization: layer by layer, or block by block when the quantizers need Hessians."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lqmod.config import LoRAConfig, Plan, TargetConfig
from lqmod.model import LayerQuantizer, QuantizeReport, replace_module
from lqmod.nn.lora_linear import LoRALinear
from lqmod.plugins import Registry
from lqmod.quantize import QuantizationError
from lqmod.streaming.source import SafetensorsSource, _assign, _is_param, _load_layer, build_skeleton
from lqmod.streaming.writer import _free, _plain_tensors, _Writer
from lqmod.types import LayerStats

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _return_freed_memory_to_os() -> None:
    """Make glibc give freed layer-sized blocks back to the OS at once.

    glibc raises its mmap threshold to the size of each large block freed, so after the
    first layer every dense layer is carved from the heap, whose freed memory stays in the
    process: measured, the resident set grew by ~130 MiB per block of the synthetic model
    (beyond its dense size) where it stays flat with a fixed 1 MiB threshold. A fixed
    threshold only turns this adaptation off; elsewhere than glibc nothing is done.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or os.uname().sysname != "Linux":
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: its allocator has its own rules
        pass


class _StreamingQuantizer(LayerQuantizer):
    """A :class:`LayerQuantizer` that forgets the dense layer it replaces (no rollback: the
    skeleton is thrown away on failure) instead of keeping it alive for :meth:`rollback`."""

    def swap(self, name: str, new: nn.Module) -> None:
        old = self.model.get_submodule(name)
        replace_module(self.model, name, new)
        _free(old)


def quantize_pretrained_streamed(
    model_dir: str | os.PathLike[str],
    quantizer: str | None = "nf",
    config: Any = None,
    *,
    out: str | os.PathLike[str],
    lora: LoRAConfig | Mapping[str, Any] | None = None,
    targets: TargetConfig | Mapping[str, Any] | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
    stats: Mapping[str, LayerStats] | None = None,
    batches: Sequence[Mapping[str, Any]] | None = None,
    sink: Any = None,
    registry: Registry | None = None,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize the model in ``model_dir`` (config.json + safetensors) into the checkpoint ``out``.

    Arguments as :func:`lqmod.model.quantize_model`. With ``batches`` (calibration forward
    calls, e.g. from :func:`lqmod.calibration.text.calibration_batches`) the quantization is
    sequential, block by block, each block's Hessians taken on the quantized blocks' outputs,
    as :func:`lqmod.calibration.quantize_model_sequential` does; ``stats`` instead supplies
    precomputed statistics (e.g. cached). ``extra`` goes into the manifest as
    ``save_checkpoint``'s does. The model is never held dense: see the module docstring.
    """
    from lqmod.io import TENSOR_METADATA, TENSORS, TensorSpool, atomic_dir, checkpoint_manifest, finish_checkpoint

    _return_freed_memory_to_os()
    source = SafetensorsSource(model_dir)
    model = build_skeleton(model_dir)
    lq = _StreamingQuantizer(model, quantizer, config, lora=lora, targets=targets, plan=plan, registry=registry,
                             seed=seed)
    names = list(lq.entries)
    plain, aliases = _plain_tensors(model, names)
    absent = [n for n in plain if n not in source]
    if absent:
        raise ValueError(
            f"{model_dir}: the model has tensors its safetensors files lack, e.g. {absent[:3]}; the files do not "
            f"belong to this config's {type(model).__name__}"
        )
    if batches is None:
        lq.check_stats(stats)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        spool = TensorSpool(tmp / ".spool")
        try:
            writer = _Writer(spool, model)
            if batches is None:
                report = _layer_by_layer(model, lq, source, writer, stats, progress)
            else:
                report = _block_by_block(model, lq, source, writer, plain, stats, batches, sink, progress)
            # One at a time: an embedding or head can be the largest tensor of the model.
            for n in [n for n in plain if n not in spool]:
                writer.tensors(source.read([n]))
            if len(writer.lora_json) != 1:
                raise ValueError("all adapted layers must share one LoRA config to be saved together")
            manifest = checkpoint_manifest(model, next(iter(writer.lora_json)), writer.headers, aliases, extra)
            digest = spool.assemble(tmp / TENSORS, TENSOR_METADATA)
        except BaseException:
            spool.close()
            raise
        finish_checkpoint(tmp, manifest, tensors_sha256=digest)
    return report


def _layer_by_layer(
    model: nn.Module,
    lq: LayerQuantizer,
    source: SafetensorsSource,
    writer: _Writer,
    stats: Mapping[str, LayerStats] | None,
    progress: bool,
) -> QuantizeReport:
    report = QuantizeReport()
    for name in tqdm(list(lq.entries), desc="quantizing (streamed)", unit="layer", disable=not progress):
        _load_layer(model, source, name)
        report.layers.append(lq.quantize(name, stats.get(name) if stats else None))
        new = model.get_submodule(name)
        assert isinstance(new, LoRALinear)
        writer.layer(name, new)
    return report


def _block_by_block(
    model: nn.Module,
    lq: LayerQuantizer,
    source: SafetensorsSource,
    writer: _Writer,
    plain: Sequence[str],
    stats: Mapping[str, LayerStats] | None,
    batches: Sequence[Mapping[str, Any]],
    sink: Any,
    progress: bool,
) -> QuantizeReport:
    from lqmod.calibration.hessian import resolve_sink
    from lqmod.calibration.sequential import _block_of, _sequential, find_blocks

    names = list(lq.entries)
    given = dict(stats or {})
    for name in names:
        other = sorted(lq.needs(name) - {"hessian"})
        if any(getattr(given.get(name), m, None) is None for m in other):
            raise QuantizationError(
                f"layer {name!r} needs {other}, which streamed sequential calibration does not compute (it takes "
                "Hessians block by block); pass them in stats (e.g. a Fisher computed once on the model)"
            )
    found = find_blocks(model, names)
    if found is None:
        raise ValueError("no nn.ModuleList of transformer blocks holds the target layers: nothing to stream by")
    list_name, blocks = found
    prefix = f"{list_name}." if list_name else ""
    outside = [n for n in names if _block_of(n, prefix, len(blocks)) is None]
    hungry = [n for n in outside if "hessian" in lq.needs(n)]
    if hungry:
        raise ValueError(
            f"layers {hungry[:3]} lie outside the transformer blocks and need Hessians, which would take a pass "
            "through the whole model; exclude them (--exclude) or quantize them without calibration"
        )
    # Everything outside the blocks (embeddings, final norm, head, outside targets) is loaded:
    # the forward pass up to block 0 needs it, and it is written at the end.
    outer = [n for n in plain if _block_of(n, prefix, len(blocks)) is None]
    for key, t in source.read(outer).items():
        _assign(model, key, t)
    for name in outside:
        _load_layer(model, source, name)
    block_plain = {k: [n for n in plain if _block_of(n, prefix, len(blocks)) == k] for k in range(len(blocks))}

    @contextmanager
    def scope(k: int, block: nn.Module) -> Iterator[None]:
        mine = f"{prefix}{k}."
        keys = [f"{mine}{n}" for n, _ in block.named_parameters()]
        keys += [f"{mine}{n}" for n, b in block.named_buffers() if f"{mine}{n}" in source]
        for key, t in source.read(keys).items():
            _assign(model, key, t)
        yield
        writer.tensors({n: model.get_parameter(n) if _is_param(model, n) else model.get_buffer(n)
                        for n in block_plain[k]})
        for local, m in list(block.named_modules()):
            if isinstance(m, LoRALinear):
                writer.layer(f"{mine}{local}", m)
        _free(block)

    with torch.no_grad():
        reports, _, _ = _sequential(
            model, lq, batches, given, keep=False, progress=progress, sink=resolve_sink(sink, 0), block_scope=scope
        )
    for name in outside:
        m = model.get_submodule(name)
        assert isinstance(m, LoRALinear)
        writer.layer(name, m)
    state = model.state_dict(keep_vars=True)
    writer.tensors({key: state[key] for key in outer})
    report = QuantizeReport()
    report.layers = [reports[n] for n in names]
    return report
