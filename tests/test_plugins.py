"""The plug-in registry: entry-point discovery, clashes, unknown names, broken plug-ins.

Third-party distributions are simulated end to end: a module and a ``*.dist-info`` folder
(METADATA + entry_points.txt) in ``tmp_path``, put on ``sys.path``, found by
``importlib.metadata`` exactly as an installed wheel would be.
"""

from __future__ import annotations

import sys
import textwrap
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch

import lqmod
from lqmod.plugins import AUTOLOAD_ENV, DISABLE_ENV, PluginClashError, PluginFailure, Registry, UnknownPluginError
from lqmod.types import QuantizerSpec

# A complete (tiny) quantizer plug-in; {name} is the quantizer name it registers.
QUANTIZER_PLUGIN = """
import torch
import lqmod
from lqmod.config import QuantizerConfig
from lqmod.types import QuantizedWeight, QuantizerSpec

def quantize(w, cfg, stats):
    return QuantizedWeight({name!r}, cfg.model_dump(), tuple(w.shape), {{"w": w.to(torch.float16)}})

def materialize(qw, dtype):
    return qw.tensors["w"].to(dtype)

@lqmod.hookimpl
def lqmod_quantizers():
    yield QuantizerSpec({name!r}, QuantizerConfig, quantize, materialize,
                        bits_per_param=lambda cfg, shape: 16.0, description="float16 storage")
"""


class FakeSite:
    """A directory of fake installed distributions, on ``sys.path`` for one test."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.modules: list[str] = []
        self._on_path = False

    def add(self, dist: str, module: str, source: str, *, entry_point: str | None = None) -> None:
        """Install distribution ``dist`` whose ``lqmod`` entry point names ``module``."""
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[lqmod]\n{entry_point or module} = {module}\n")
        self.modules.append(module)
        # (Re)prepending also invalidates the import and metadata caches, so files written
        # after the directory was first scanned are seen.
        self.monkeypatch.syspath_prepend(str(self.root))

    def cleanup(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    fake = FakeSite(tmp_path, monkeypatch)
    yield fake
    fake.cleanup()


@pytest.fixture(autouse=True)
def _autoload_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # The switches may be set in a developer's shell; these tests set them themselves.
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)


def fresh_registry() -> Registry:
    """A registry built now, failing the test on any warning (a plug-in that did not load)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Registry()


# -- discovery ---------------------------------------------------------------------------


def test_example_third_party_plugin_is_found_through_its_entry_point() -> None:
    try:
        dist = metadata.distribution("lqmod-example-rtn")
    except metadata.PackageNotFoundError:
        pytest.fail("lqmod-example-rtn is not installed: pip install -e plugins/lqmod-example-rtn")
    assert [(ep.name, ep.value) for ep in dist.entry_points if ep.group == "lqmod"] == [("rtn", "lqmod_example_rtn")]
    registry = lqmod.get_registry(reload=True)
    assert registry.failures == []
    spec = registry.quantizer("rtn")
    assert spec.quantize.__module__.startswith("lqmod_example_rtn")
    rows = {(r["kind"], r["name"]): r for r in registry.describe()}
    assert rows[("quantizer", "rtn")]["distribution"] == "lqmod-example-rtn"
    # Built-ins come through the same entry-point group, from lqmod's own distribution.
    assert rows[("quantizer", "nf")]["distribution"] == "lqmod"
    assert rows[("initializer", "default")]["distribution"] == "lqmod"


def test_a_distribution_on_sys_path_is_discovered_and_usable(site: FakeSite) -> None:
    site.add("acme-quant", "acme_quant_plugin", QUANTIZER_PLUGIN.format(name="acme"))
    registry = fresh_registry()
    assert {"acme", "nf", "rtn"} <= set(registry.quantizers())
    row = next(r for r in registry.describe() if r["name"] == "acme")
    assert row == {
        "kind": "quantizer",
        "name": "acme",
        "distribution": "acme-quant",
        "description": "float16 storage",
    }
    w = torch.randn(4, 8)
    qw = lqmod.quantize_weight(registry.quantizer("acme"), w)
    assert torch.equal(registry.quantizer("acme").materialize(qw, torch.float32), w.half().float())


def test_get_registry_is_built_once() -> None:
    first = lqmod.get_registry()
    assert lqmod.get_registry() is first
    assert lqmod.get_registry(reload=True) is not first


# -- clashes -----------------------------------------------------------------------------


def _clash_warning_registry() -> Registry:
    registry = Registry()
    with pytest.warns(RuntimeWarning, match="registered twice"):
        registry.quantizers()  # builds the table, finds (and warns about) the clash
    return registry


def test_name_clash_between_two_distributions_names_both(site: FakeSite) -> None:
    site.add("clash-one", "clash_one_plugin", QUANTIZER_PLUGIN.format(name="twin"))
    site.add("clash-two", "clash_two_plugin", QUANTIZER_PLUGIN.format(name="twin"))
    registry = _clash_warning_registry()
    # Only the clashing name is an error; everything else works.
    assert registry.quantizer("nf").name == "nf"
    assert "twin" not in registry.quantizers()
    with pytest.raises(PluginClashError) as info:
        registry.quantizer("twin")
    message = str(info.value)
    assert "quantizer 'twin' is registered twice" in message
    for part in ("clash-one", "clash-two", "'clash_one_plugin'", "'clash_two_plugin'", "LQMOD_DISABLE_PLUGINS"):
        assert part in message
    assert any("twin" in f.entry_point and "registered twice" in f.error for f in registry.failures)
    assert "default" in registry.initializers()


def test_clash_with_a_builtin_names_the_builtin_plugin(site: FakeSite) -> None:
    # lqmod's distribution holds several plug-ins: the message must name the one that
    # registered "nf", not merely the first plug-in of that distribution.
    site.add("nf-impostor", "nf_impostor_plugin", QUANTIZER_PLUGIN.format(name="nf"))
    registry = _clash_warning_registry()
    with pytest.raises(PluginClashError) as info:
        registry.quantizer("nf")
    message = str(info.value)
    assert "by lqmod (plug-in 'nf')" in message
    assert "nf-impostor (plug-in 'nf_impostor_plugin')" in message
    # The rest of the tool keeps working: other quantizers, describe() (`lqmod plugins`).
    assert registry.quantizer("rtn").name == "rtn"
    assert {r["name"] for r in registry.describe()} >= {"rtn", "optq", "default"}


def test_lqmod_plugins_still_works_with_a_clash(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lqmod.plugins
    from lqmod.cli import main

    site.add("nf-impostor", "nf_impostor_plugin", QUANTIZER_PLUGIN.format(name="nf"))
    # The command builds the process-wide registry; the original comes back after the test.
    monkeypatch.setattr(lqmod.plugins, "_default", None)
    with pytest.warns(RuntimeWarning, match="registered twice"):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "rtn" in out and "optq" in out and "registered twice" in out


def test_a_clash_is_resolved_by_disabling_one_plugin(site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    site.add("nf-impostor", "nf_impostor_plugin", QUANTIZER_PLUGIN.format(name="nf"))
    monkeypatch.setenv(DISABLE_ENV, "nf-impostor")  # by distribution name
    registry = fresh_registry()
    assert registry.quantizer("nf").quantize.__module__.startswith("lqmod_nf")
    assert registry.disabled == ["nf_impostor_plugin (nf-impostor)"]
    monkeypatch.setenv(DISABLE_ENV, " rtn , nf_impostor_plugin")  # by entry-point name, spaces ignored
    registry = fresh_registry()
    assert "rtn" not in registry.quantizers()
    assert {"nf", "optq"} <= set(registry.quantizers())


def test_entry_point_name_reused_by_another_distribution_still_loads(site: FakeSite) -> None:
    # Entry-point names are per distribution; "rtn" is also the example plug-in's.
    site.add("other-rtn", "other_rtn_plugin", QUANTIZER_PLUGIN.format(name="rtn2"), entry_point="rtn")
    registry = fresh_registry()
    assert registry.failures == []
    assert {"rtn", "rtn2"} <= set(registry.quantizers())
    assert registry.origin("lqmod_quantizers", "rtn2") == "other-rtn"
    assert registry.origin("lqmod_quantizers", "rtn") == "lqmod-example-rtn"


def test_entry_point_name_reuse_with_a_clashing_quantizer_is_reported(site: FakeSite) -> None:
    site.add("other-rtn", "other_rtn_plugin", QUANTIZER_PLUGIN.format(name="rtn"), entry_point="rtn")
    with pytest.raises(PluginClashError, match=r"lqmod-example-rtn.*other-rtn|other-rtn.*lqmod-example-rtn"):
        _clash_warning_registry().quantizer("rtn")


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (
            "import lqmod\n@lqmod.hookimpl\ndef lqmod_quantizers():\n    raise RuntimeError('boom')\n    yield\n",
            "RuntimeError: boom",
        ),
        (
            "import lqmod\n@lqmod.hookimpl\ndef lqmod_quantizers():\n    yield 'not a spec'\n",
            "must yield lqmod.types.QuantizerSpec",
        ),
        (
            "import lqmod\n@lqmod.hookimpl\ndef lqmod_quantizer():\n    return []\n",
            "did you mean 'lqmod_quantizers'",
        ),
    ],
    ids=["hook-raises", "hook-yields-non-spec", "misspelled-hook"],
)
def test_a_broken_hook_is_reported_and_skipped(site: FakeSite, source: str, error: str) -> None:
    site.add("broken-hook", "broken_hook_plugin", source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry()
        quantizers = registry.quantizers()
    assert any("broken_hook_plugin" in str(w.message) for w in caught)
    assert {"nf", "rtn"} <= set(quantizers)
    assert [f.entry_point for f in registry.failures] == ["broken_hook_plugin"]
    assert error in registry.failures[0].error
    assert registry.failures[0].distribution == "broken-hook"


def test_a_misspelled_hook_is_refused_on_manual_register() -> None:
    class Typo:
        @lqmod.hookimpl
        def lqmod_alocators(self) -> list[object]:
            return []

    registry = Registry(autoload=False)
    with pytest.raises(Exception, match="'lqmod_alocators', which lqmod does not have; did you mean 'lqmod_alloc"):
        registry.register(Typo(), name="typo")
    assert not registry.pm.has_plugin("typo")


# -- unknown names -------------------------------------------------------------------------


def test_unknown_name_lists_the_available_ones() -> None:
    registry = fresh_registry()
    with pytest.raises(UnknownPluginError) as info:
        registry.quantizer("nf5")
    available = sorted(registry.quantizers())
    assert str(info.value) == f"unknown quantizer 'nf5'. Choose one of: {', '.join(available)}"
    assert {"nf", "rtn"} <= set(available)
    assert isinstance(info.value, KeyError)  # callers may catch it as a missing key
    with pytest.raises(UnknownPluginError, match=r"unknown initializer 'lq'\. Choose one of: .*default"):
        registry.initializer("lq")


def test_unknown_name_in_an_empty_registry() -> None:
    with pytest.raises(UnknownPluginError, match=r"Choose one of: \(none registered\)"):
        Registry(autoload=False).allocator("milp")


# -- broken plug-ins -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("raise RuntimeError('boom: missing CUDA toolkit')", "RuntimeError: boom: missing CUDA toolkit"),
        (
            "import lqmod_no_such_dependency",
            "ModuleNotFoundError: No module named 'lqmod_no_such_dependency'",
        ),
        (
            # A hook written against another lqmod: pluggy rejects the unknown argument.
            "import lqmod\n@lqmod.hookimpl\ndef lqmod_quantizers(config):\n    return []\n",
            "PluginValidationError",
        ),
    ],
    ids=["raises", "missing-dependency", "bad-hook-signature"],
)
def test_a_broken_plugin_is_reported_and_skipped(site: FakeSite, source: str, error: str) -> None:
    site.add("broken-quant", "broken_quant_plugin", source)
    site.add("fine-quant", "fine_quant_plugin", QUANTIZER_PLUGIN.format(name="fine"))
    with pytest.warns(RuntimeWarning, match="'broken_quant_plugin' from broken-quant failed to load"):
        registry = Registry()
    assert len(registry.failures) == 1
    failure = registry.failures[0]
    assert isinstance(failure, PluginFailure)
    assert (failure.entry_point, failure.distribution) == ("broken_quant_plugin", "broken-quant")
    assert failure.error.startswith(error)
    # Everything else loaded: the built-ins and the other third-party plug-in.
    assert {"nf", "rtn", "fine"} <= set(registry.quantizers())
    assert not registry.pm.has_plugin("broken_quant_plugin")


# -- the autoload switch ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "YES", " 1 "])
def test_disable_autoload_loads_nothing(site: FakeSite, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    site.add("broken-quant", "broken_quant_plugin", "raise RuntimeError('must not be imported')")
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    registry = fresh_registry()  # no warning: the broken plug-in is not even imported
    assert registry.failures == []
    assert registry.quantizers() == {}
    assert registry.initializers() == {}
    assert registry.allocators() == {}
    assert registry.describe() == []
    assert "broken_quant_plugin" not in sys.modules
    # An explicit argument wins over the environment.
    with pytest.warns(RuntimeWarning, match="must not be imported"):
        assert "nf" in Registry(autoload=True).quantizers()


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_other_values_of_the_switch_keep_autoload(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    assert "nf" in fresh_registry().quantizers()


# -- registering by hand --------------------------------------------------------------------


class HandMadePlugin:
    """A plug-in can be any object with hook implementations, not only a module."""

    @lqmod.hookimpl
    def lqmod_quantizers(self) -> list[QuantizerSpec]:
        nf = Registry().quantizer("nf")
        return [QuantizerSpec("nf-copy", nf.config_model, nf.quantize, nf.materialize, nf.bits_per_param)]


def test_manual_register_and_unregister() -> None:
    registry = Registry(autoload=False)
    assert registry.quantizers() == {}
    plugin = HandMadePlugin()
    registry.register(plugin, name="hand-made", distribution="my-lab")
    assert set(registry.quantizers()) == {"nf-copy"}  # the cached (empty) table was dropped
    assert registry.describe()[0]["distribution"] == "my-lab"
    with pytest.raises(PluginClashError, match="'hand-made' from elsewhere is already registered \\(by my-lab\\)"):
        registry.register(HandMadePlugin(), name="hand-made", distribution="elsewhere")
    with pytest.raises(PluginClashError, match="already registered as 'hand-made'"):
        registry.register(plugin, name="again")
    registry.unregister("hand-made")
    with pytest.raises(UnknownPluginError):
        registry.quantizer("nf-copy")


def test_manual_register_next_to_entry_points_clashes_by_name() -> None:
    registry = fresh_registry()
    registry.register(HandMadePlugin(), name="hand-made")
    assert "nf-copy" in registry.quantizers()
    registry.register(HandMadePlugin(), name="hand-made-twice", distribution="my-lab")
    with pytest.warns(RuntimeWarning, match="registered twice"):
        registry.quantizers()
    with pytest.raises(PluginClashError, match=r"<local> \(plug-in 'hand-made'\) and by my-lab"):
        registry.quantizer("nf-copy")
