"""StatsCache: bit-exact roundtrip, keys that notice changes, damage handled, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lqmod.calibration import StatsCache, default_cache_root
from lqmod.calibration import cache as cache_mod
from lqmod.types import LayerStats


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _stats() -> dict[str, LayerStats]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    return {
        "a": LayerStats(hessian=x.T @ x, n_tokens=10, act_absmean=x.abs().mean(0).float()),
        "b": LayerStats(fisher=torch.rand(2, 3, generator=g), n_tokens=0),
    }


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))}]


def test_roundtrip_is_bit_exact(tmp_path: Path) -> None:
    cache = StatsCache(tmp_path)
    stats = _stats()
    key = cache.key(_Net(), ["a", "b"], _batches(), "hessian")
    assert cache.load(key) is None
    cache.save(key, stats, meta={"text": "unit"})
    back = cache.load(key)
    assert back is not None and set(back) == {"a", "b"}
    for name, s in stats.items():
        for f in ("hessian", "fisher", "act_absmean"):
            want, got = getattr(s, f), getattr(back[name], f)
            assert (want is None) == (got is None)
            if want is not None:
                assert got.dtype == want.dtype and torch.equal(got, want)
        assert back[name].n_tokens == s.n_tokens
    manifest = cache.manifest(key)
    assert manifest is not None and manifest["meta"] == {"text": "unit"}
    assert [p.name for p in tmp_path.iterdir()] == [key]  # no temporary left behind


def test_key_changes_with_weights_text_kind_and_extra(tmp_path: Path) -> None:
    cache = StatsCache(tmp_path)
    torch.manual_seed(0)
    net = _Net()
    key = cache.key(net, ["a"], _batches(), "hessian")
    assert cache.key(net, ["a"], _batches(), "hessian") == key
    assert cache.key(net, ["a"], _batches(1), "hessian") != key
    assert cache.key(net, ["a"], _batches() * 2, "hessian") != key
    assert cache.key(net, ["a"], _batches(), "fisher") != key
    assert cache.key(net, ["a"], _batches(), "hessian", loss="contrastive") != key
    assert cache.key(net, ["a", "b"], _batches(), "hessian") != key
    with torch.no_grad():
        net.b.weight[0, 0] += 1e-6  # a later layer's weight: still a different model
    assert cache.key(net, ["a"], _batches(), "hessian") != key


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_damaged_entry_is_a_miss_with_a_warning(tmp_path: Path, damage: str) -> None:
    cache = StatsCache(tmp_path)
    key = "ab" * 32
    cache.save(key, _stats())
    data = tmp_path / key / "stats.safetensors"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "manifest":
        (tmp_path / key / "manifest.json").write_text("{not json")
    else:
        data.unlink()
    with pytest.warns(RuntimeWarning, match="damaged statistics cache entry"):
        assert cache.load(key) is None
    # get_or_compute repairs it.
    with pytest.warns(RuntimeWarning):
        again = cache.get_or_compute(key, _stats)
    got_h, want_h = again["a"].hessian, _stats()["a"].hessian
    assert got_h is not None and want_h is not None and torch.equal(got_h, want_h)
    assert cache.load(key) is not None


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = StatsCache(tmp_path)
    key = "cd" * 32
    cache.save(key, _stats())
    before = json.loads((tmp_path / key / "manifest.json").read_text())

    def boom(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.save(key, {"a": LayerStats(hessian=torch.zeros(4, 4), n_tokens=1)})
    with pytest.raises(OSError, match="disk full"):
        cache.save("ef" * 32, _stats())
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]  # no partial entry, no temp dir
    assert json.loads((tmp_path / key / "manifest.json").read_text()) == before  # old entry intact


def test_get_or_compute_computes_once(tmp_path: Path) -> None:
    cache = StatsCache(tmp_path)
    calls = []

    def compute() -> dict[str, LayerStats]:
        calls.append(1)
        return _stats()

    key = "12" * 32
    cache.get_or_compute(key, compute)
    cache.get_or_compute(key, compute)
    assert len(calls) == 1


def test_default_root_and_bad_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LQMOD_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    assert StatsCache().root == tmp_path / "c"
    monkeypatch.delenv("LQMOD_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "lqmod" / "stats"
    with pytest.raises(ValueError, match="hex digest"):
        StatsCache(tmp_path).load("../etc")
