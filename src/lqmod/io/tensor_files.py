"""safetensors files with a deterministic header, written from memory or spooled to disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lqmod.io.format import CheckpointError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                      metadata: Mapping[str, str] | None = None) -> None:
    """:func:`safetensors.torch.save_file` with a byte-for-byte deterministic header.

    safetensors keeps the string metadata in a hash map whose iteration order changes from
    one process to the next, so identical tensors gave files with different hashes; the
    header is rewritten here with the metadata keys sorted (same length, same offsets).
    """
    path = Path(path)
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    with path.open("r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        ordered: dict[str, Any] = {}
        if meta is not None:
            ordered["__metadata__"] = dict(sorted(meta.items()))
        ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) <= n:
            fh.seek(8)
            fh.write(raw + b" " * (n - len(raw)))  # safetensors pads its header with spaces
            return
    # A header spelled longer than safetensors' own (it never is for ASCII names): rewrite the file.
    padded = raw + b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".canon")
    with path.open("rb") as src, tmp.open("wb") as dst:
        src.seek(8 + n)
        dst.write(len(padded).to_bytes(8, "little") + padded)
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(path)


class TensorSpool:
    """Tensors written to disk as they are made, assembled into one safetensors file at the end.

    A model too large for memory is saved this way: each tensor is appended to a spool file
    and dropped; :meth:`assemble` then copies the bytes into ``model.safetensors`` in the
    order and with the header :func:`write_safetensors` gives the same tensors held in
    memory, so both paths write byte-identical files. Memory: one tensor at a time, then a
    copy buffer; disk: the spool beside the result until it is assembled.
    """

    _CHUNK = 1 << 24

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh = self.path.open("wb")
        self._index: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._offset = 0

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._index:
            raise ValueError(f"tensor {name!r} was already written to the spool")
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        self._fh.write(raw.numpy().tobytes() if raw.numel() < self._CHUNK else raw.numpy().data)
        self._index[name] = (t.dtype, tuple(t.shape), self._offset, int(raw.numel()))
        self._offset += int(raw.numel())

    def _layout(self) -> tuple[list[str], dict[str, str]]:
        """safetensors' own order of the tensors and its dtype names, asked of safetensors itself
        (one-element stand-ins, so it costs nothing) rather than re-implemented."""
        from safetensors.torch import save

        dummy = {name: torch.zeros(1, dtype=dtype) for name, (dtype, _, _, _) in self._index.items()}
        raw = save(dummy)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        order = sorted(header, key=lambda k: (header[k]["data_offsets"][0], k))
        return order, {k: str(v["dtype"]) for k, v in header.items()}

    def assemble(self, target: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> str:
        """Write the safetensors file ``target``, delete the spool; return the file's SHA-256."""
        self._fh.close()
        order, dtypes = self._layout()
        ordered: dict[str, Any] = {}
        if metadata:
            ordered["__metadata__"] = dict(sorted(metadata.items()))
        start = 0
        for name in order:
            _, shape, _, nbytes = self._index[name]
            ordered[name] = {"dtype": dtypes[name], "shape": list(shape), "data_offsets": [start, start + nbytes]}
            start += nbytes
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
        digest = hashlib.sha256()
        with Path(target).open("wb") as dst, self.path.open("rb") as src:
            for piece in (len(raw).to_bytes(8, "little"), raw):
                dst.write(piece)
                digest.update(piece)
            for name in order:
                _, _, offset, nbytes = self._index[name]
                src.seek(offset)
                while nbytes:
                    chunk = src.read(min(nbytes, self._CHUNK))
                    if not chunk:
                        raise CheckpointError(f"spool {self.path} ended early while copying {name!r}")
                    dst.write(chunk)
                    digest.update(chunk)
                    nbytes -= len(chunk)
        self.path.unlink()
        return digest.hexdigest()

    def close(self) -> None:
        """Drop the spool without assembling it (after a failure)."""
        self._fh.close()
        self.path.unlink(missing_ok=True)
