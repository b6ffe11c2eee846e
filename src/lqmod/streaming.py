"""Quantize a model straight from its safetensors files, one layer (or block) at a time.

The model is built as a skeleton on the meta device (no memory); each dense weight is read
from its file when its layer's turn comes, quantized, written to the checkpoint's spool and
dropped, so peak memory is about one dense layer plus one quantized layer plus the
calibration state, not the dense model. Calibrated quantizers run in GPTQ's sequential
mode (:mod:`lqmod.calibration.sequential`) with each transformer block loaded on entry and
written and freed on exit; only that block, the embedding and the block inputs of the
calibration batches are in memory at once.

The checkpoint is written incrementally into a temporary directory (:class:`lqmod.io.TensorSpool`)
and renamed into place only when complete (:func:`lqmod.io.atomic_dir`); it is the same
format-v2 checkpoint, byte for byte, that :func:`lqmod.model.quantize_model` then
:func:`lqmod.io.save_checkpoint` write for the same model loaded in float32.
"""

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
from lqmod.types import LayerStats

__all__ = ["SafetensorsSource", "build_skeleton", "quantize_pretrained_streamed"]


class SafetensorsSource:
    """The tensors of a model directory's safetensors files, read on demand.

    Reads go through ``safe_open`` and each file is opened only for the duration of one
    read, so no mapping of a (possibly huge) file outlives the tensors taken from it.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.root = Path(model_dir)
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{self.root} has no *.safetensors files: streamed quantization reads safetensors weights only "
                "(convert a GGUF or pickle checkpoint once with transformers' save_pretrained)"
            )
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    if key in self.where:
                        raise ValueError(f"tensor {key!r} is in both {self.where[key].name} and {f.name}")
                    self.where[key] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``names`` as float32 (floating tensors; others as stored), grouped by file."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.where]
        if missing:
            raise KeyError(f"{self.root} holds no tensor {missing[0]!r} (and {len(missing) - 1} more missing)")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for n in group:
                    t = fh.get_tensor(n)
                    # A cast makes a fresh tensor; a float32 one is cloned off the file mapping.
                    out[n] = t.to(torch.float32) if t.is_floating_point() and t.dtype != torch.float32 else t.clone()
        return out


def build_skeleton(model_dir: str | os.PathLike[str]) -> nn.Module:
    """The transformers model of ``model_dir`` on the meta device, as :func:`lqmod.hf.load_local_model`
    would build it in float32 (same class, config and tied weights), holding no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    # Buffers stay real: rotary tables are computed, not loaded, and are needed to run blocks.
    with init_empty_weights(include_buffers=False):
        model: nn.Module = cls.from_config(config, dtype=torch.float32)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # from_pretrained ties the embeddings to the head; from_config leaves that to loading
    return model.eval()


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


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _free(module: nn.Module) -> None:
    """Drop a module's tensors (they were written): meta tensors of the same shapes."""
    module.to("meta")


class _StreamingQuantizer(LayerQuantizer):
    """A :class:`LayerQuantizer` that forgets the dense layer it replaces (no rollback: the
    skeleton is thrown away on failure) instead of keeping it alive for :meth:`rollback`."""

    def swap(self, name: str, new: nn.Module) -> None:
        old = self.model.get_submodule(name)
        replace_module(self.model, name, new)
        _free(old)


class _Writer:
    """The checkpoint being written: tensors to the spool, layer headers to the manifest."""

    def __init__(self, spool: Any, model: nn.Module) -> None:
        self.spool = spool
        self.model = model
        self.headers: dict[str, dict[str, Any]] = {}
        self.lora_json: set[str] = set()

    def layer(self, name: str, m: LoRALinear) -> None:
        from lqmod.io import layer_header

        for key, t in m.state_dict().items():
            self.spool.add(f"{name}.{key}", t)
        self.headers[name] = layer_header(m)
        self.lora_json.add(m.lora_config.model_dump_json())
        # Out of the model altogether: a layer's QuantizedWeight holds its tensors beside the
        # module's buffers, so moving the module to meta would keep the quantized model alive.
        replace_module(self.model, name, nn.Identity())

    def tensors(self, items: Mapping[str, torch.Tensor]) -> None:
        for key, t in items.items():
            self.spool.add(key, t)


def _plain_tensors(model: nn.Module, targets: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """State-dict names outside the quantized layers, and tied ones (alias -> kept name).

    The kept name of a tied tensor is its first name in state-dict order, as
    :func:`lqmod.io.save_checkpoint` keeps it.
    """
    prefixes = tuple(f"{t}." for t in targets)
    plain: list[str] = []
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(prefixes):
            continue
        if id(t) in first and t.numel():
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        plain.append(name)
    return plain, aliases


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


def _load_layer(model: nn.Module, source: SafetensorsSource, name: str) -> None:
    module = model.get_submodule(name)
    keys = [f"{name}.{k}" for k, _ in module.named_parameters(recurse=False)]
    for key, t in source.read(keys).items():
        _assign(model, key, t)


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


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in (model.get_submodule(owner) if owner else model)._parameters



def stream_command(args: Any, *, quantizer: str | None, config: Any, lora: Any, targets: Any,
                   plan: Any) -> QuantizeReport:
    """``lqmod quantize MODEL --stream``: the streamed path, calibration batches included."""
    from lqmod.calibration.command import sink_from_args
    from lqmod.hf import load_local_tokenizer, resolve_model

    where = resolve_model(args.model)
    if where.gguf_file:
        raise ValueError(
            f"--stream reads safetensors files; {args.model} is the GGUF file {where.gguf_file}: convert it once "
            "(transformers from_pretrained(..., gguf_file=...).save_pretrained(DIR)) and quantize DIR"
        )
    skeleton = build_skeleton(where.path)
    lq = LayerQuantizer(skeleton, quantizer, config, lora=lora, targets=targets, plan=plan, registry=None, seed=0)
    needs = {s for name in lq.entries for s in lq.needs(name)}
    batches = None
    if needs or args.sequential:
        if needs - {"hessian"}:
            other = sorted(needs - {"hessian"})
            raise ValueError(
                f"--stream computes Hessians block by block; the chosen quantizer(s) also need {other}, which take "
                "the whole model: quantize without --stream"
            )
        if not args.sequential:
            raise ValueError("--stream calibrates block by block: add --sequential (with --calib-text and --n-calib)")
        if args.calib_text is None:
            raise ValueError("--sequential needs --calib-text (wikitext2, ptb or a UTF-8 file) and --n-calib N")
        from lqmod.calibration.text import calibration_batches

        tokenizer = load_local_tokenizer(str(where.path))
        batches = calibration_batches(tokenizer, where.kind if where.kind != "auto" else "causal-lm",
                                      args.calib_text, args.n_calib, length=args.calib_seq_len)
    del skeleton, lq
    return quantize_pretrained_streamed(
        where.path, quantizer, config, out=args.out, lora=lora, targets=targets, plan=plan, batches=batches,
        sink=sink_from_args(args, model_kind=where.kind if where.kind != "auto" else "causal-lm"),
        overwrite=args.overwrite, extra={"source_model": str(where.path)},
        progress=not getattr(args, "no_progress", False),
    )
