"""Property-based (hypothesis) tests of checkpoint loading: a damaged checkpoint gives either
a clear error or exactly the original model, never a silently different one.

Four families of damage, each drawn at random:

* bytes of ``lqmod.json`` flipped, deleted, inserted or truncated;
* one node of the parsed manifest replaced, deleted, added to or tweaked;
* one field of a layer's header (quantizer, config, shape, tensor list) changed *and the
  manifest's hashes recomputed*, as a tool editing manifests consistently would: only the
  quantizers' ``validate`` hooks and the core's checks stand between it and garbage;
* bytes of ``model.safetensors`` flipped, truncated or appended.

"Clear error" means one of lqmod's user-facing exception types with a one-line message;
any other exception (TypeError, AttributeError, a raw KeyError ...) or a loaded model that
differs in any bit from the original fails the property. Examples are derandomized so CI
runs are repeatable; the number of cases per family is in ``CASES`` (printed with ``-s``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lqmod.io as lio  # noqa: E402
from lqmod.config import ConfigError  # noqa: E402
from lqmod.model import iter_lora_layers, quantize_model  # noqa: E402
from lqmod.plugins import PluginClashError, UnknownPluginError  # noqa: E402
from lqmod.quantize import QuantizationError  # noqa: E402

pytestmark = pytest.mark.slow

CLEAR_ERRORS = (lio.CheckpointError, ConfigError, QuantizationError, UnknownPluginError, PluginClashError)
CASES: Counter[str] = Counter()
INPUT = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
SETTINGS = settings(
    # LQMOD_FUZZ_EXAMPLES=2000 for a longer search than CI's.
    max_examples=int(os.environ.get("LQMOD_FUZZ_EXAMPLES", "120")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _skeleton() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, torch.Tensor], torch.Tensor]]:
    root = tmp_path_factory.mktemp("fuzz")
    model = _skeleton()
    quantize_model(model, "nf", {"blocksize": 32}, lora={"r": 2}, progress=False)
    g = torch.Generator().manual_seed(1)
    for _, layer in iter_lora_layers(model):
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    lio.save_checkpoint(model, root / "ckpt")
    reloaded = lio.load_checkpoint(root / "ckpt", model=_skeleton())
    with torch.no_grad():
        out = reloaded(INPUT)
    yield root / "ckpt", {k: v.clone() for k, v in reloaded.state_dict().items()}, out
    shutil.rmtree(root, ignore_errors=True)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def _check(path: Path, reference: dict[str, torch.Tensor], out: torch.Tensor, family: str) -> None:
    """The property: a clear one-line error, or the original model bit for bit."""
    CASES[family] += 1
    try:
        model = lio.load_checkpoint(path, model=_skeleton())
    except CLEAR_ERRORS as exc:
        message = str(exc)
        assert message and "\n" not in message, f"unclear message {message!r}"
        CASES[family + ": clear error"] += 1
        return
    state = model.state_dict()
    assert state.keys() == reference.keys(), "loaded a model with other tensors"
    for k, v in reference.items():
        assert _bitwise(state[k], v), f"loaded a silently different model: {k} differs"
    with torch.no_grad():
        assert _bitwise(model(INPUT), out), "loaded a model whose output differs"
    CASES[family + ": identical model"] += 1


def _copy(src: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# -- strategies --------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _paths(v, (*prefix, i))
    return found


def _tweak(value: Any, data: st.DataObject) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + data.draw(st.sampled_from([-64, -1, 1, 2, 32, 10**6]))
    if isinstance(value, float):
        return data.draw(st.sampled_from([value * 2, -value, value + 1e-7, float("inf"), float("nan")]))
    if isinstance(value, str):
        return data.draw(st.sampled_from([value + "x", value[:-1], value.upper(), "", " " + value]))
    if isinstance(value, list) and value:
        return value[1:]
    if isinstance(value, dict) and value:
        return {k: v for i, (k, v) in enumerate(value.items()) if i}
    return data.draw(JSON)


def _mutate(manifest: Any, path: tuple[Any, ...], data: st.DataObject) -> Any:
    """Return the manifest with the node at ``path`` replaced, deleted, extended or tweaked."""
    if not path:
        return data.draw(st.sampled_from([[], [manifest], "x", 0, None]))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = data.draw(st.sampled_from(["replace", "delete", "tweak", "add"]))
    if action == "replace":
        parent[last] = data.draw(JSON)
    elif action == "delete":
        del parent[last]
    elif action == "tweak":
        parent[last] = _tweak(parent[last], data)
    elif isinstance(parent[last], dict):
        parent[last][data.draw(st.text(min_size=1, max_size=5))] = data.draw(JSON)
    elif isinstance(parent[last], list):
        parent[last].append(data.draw(JSON))
    else:
        parent[last] = [parent[last]]
    return manifest


def _resign(manifest: dict[str, Any]) -> None:
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    try:
        manifest["integrity"] = {
            "algorithm": "sha256",
            "layers": {n: lio._digest(h) for n, h in body["layers"].items()},
            "manifest": lio._digest(body),
        }
    except ValueError:  # NaN / inf: no JSON-compliant writer could have signed this
        assume(False)


# -- the properties ----------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_manifest_byte_damage(original: Any, tmp_path: Path, data: st.DataObject) -> None:
    src, reference, out = original
    path = _copy(src, tmp_path, "bytes")
    raw = bytearray((src / "lqmod.json").read_bytes())
    kind = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "delete":
        del raw[at : at + data.draw(st.integers(1, 16))]
    elif kind == "insert":
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        del raw[at:]
    (path / "lqmod.json").write_bytes(bytes(raw))
    _check(path, reference, out, "manifest bytes")


@SETTINGS
@given(data=st.data())
def test_manifest_structure_damage(original: Any, tmp_path: Path, data: st.DataObject) -> None:
    src, reference, out = original
    path = _copy(src, tmp_path, "structure")
    manifest = json.loads((src / "lqmod.json").read_text())
    target = data.draw(st.sampled_from(_paths(manifest)))
    manifest = _mutate(manifest, target, data)
    (path / "lqmod.json").write_text(json.dumps(manifest))
    _check(path, reference, out, "manifest structure")


@SETTINGS
@given(data=st.data())
def test_consistently_edited_layer_headers(original: Any, tmp_path: Path, data: st.DataObject) -> None:
    # The hashes are recomputed: what is left are the quantizer's validate hook, the exact
    # storage-bits check, header parsing and the adapters' shapes.
    src, reference, out = original
    path = _copy(src, tmp_path, "resigned")
    manifest = json.loads((src / "lqmod.json").read_text())
    layer = data.draw(st.sampled_from(sorted(manifest["layers"])))
    header = manifest["layers"][layer]
    editable = [p for p in _paths(header) if p and p[0] in ("quantizer", "config", "shape", "tensors")]
    target = data.draw(st.sampled_from(editable))
    manifest["layers"][layer] = _mutate(header, target, data)
    _resign(manifest)
    (path / "lqmod.json").write_text(json.dumps(manifest))
    _check(path, reference, out, "re-signed header")


@SETTINGS
@given(data=st.data())
def test_safetensors_damage(original: Any, tmp_path: Path, data: st.DataObject) -> None:
    src, reference, out = original
    path = _copy(src, tmp_path, "tensors")
    raw = bytearray((src / "model.safetensors").read_bytes())
    kind = data.draw(st.sampled_from(["flip-header", "flip-data", "truncate", "append"]))
    if kind == "flip-header":
        at = data.draw(st.integers(0, 8 + int.from_bytes(raw[:8], "little") - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "flip-data":
        at = data.draw(st.integers(8 + int.from_bytes(raw[:8], "little"), len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    (path / "model.safetensors").write_bytes(bytes(raw))
    _check(path, reference, out, "safetensors")


def test_zz_report_case_counts() -> None:
    # Runs after the properties in this module (file order): the number of cases tried.
    families = ("manifest bytes", "manifest structure", "re-signed header", "safetensors")
    ran = {f: CASES[f] for f in families if CASES[f]}
    if not ran:
        pytest.skip("the property tests did not run in this session")
    print("checkpoint fuzz cases:", dict(CASES))
    assert all(n >= min(50, SETTINGS.max_examples) for n in ran.values()), ran
