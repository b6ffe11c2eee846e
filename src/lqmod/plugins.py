"""The plug-in registry: built-ins and third-party plug-ins, found the same way.

Every plug-in, ours included, is announced through the ``lqmod`` entry-point group. One
bad plug-in never takes lqmod down: a plug-in that fails to import, implements a hook lqmod
does not have (a misspelled name) or with the wrong signature, whose hook raises, or that
yields something other than the spec type, is recorded in :attr:`Registry.failures`,
warned about and skipped. A name two plug-ins register is dropped from the table and
reported the same way; only *using* that name is an error (naming both distributions).

Switches (environment variables, read when the registry is built):

* ``LQMOD_DISABLE_PLUGINS=name,...``: skip these plug-ins, by entry-point name (``nf``,
  ``rtn``) or distribution name (``lqmod-example-rtn``); the others still load.
* ``LQMOD_DISABLE_PLUGIN_AUTOLOAD=1``: skip entry points altogether (plug-ins can then be
  registered by hand with :meth:`Registry.register`).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import pluggy

from lqmod import hookspecs
from lqmod.types import AdapterSpec, AllocatorSpec, InitializerSpec, QuantizerSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginClashError",
    "PluginFailure",
    "Registry",
    "UnknownPluginError",
    "get_registry",
]

ENTRY_POINT_GROUP = "lqmod"
AUTOLOAD_ENV = "LQMOD_DISABLE_PLUGIN_AUTOLOAD"
DISABLE_ENV = "LQMOD_DISABLE_PLUGINS"

S = TypeVar("S", QuantizerSpec, InitializerSpec, AllocatorSpec, AdapterSpec)


class PluginClashError(RuntimeError):
    """Two plug-ins registered the same name."""


class UnknownPluginError(KeyError):
    """A name no plug-in registered. ``str()`` lists the available names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class PluginFailure:
    """A plug-in (or one of its hooks, or a clashing name) that was skipped, and why."""

    entry_point: str
    distribution: str
    error: str


_SPEC_TYPES: dict[str, type] = {
    "lqmod_quantizers": QuantizerSpec,
    "lqmod_initializers": InitializerSpec,
    "lqmod_allocators": AllocatorSpec,
    "lqmod_adapters": AdapterSpec,
}


def _disabled_names(value: str | None) -> frozenset[str]:
    return frozenset(n.strip() for n in (value or "").split(",") if n.strip())


class Registry:
    """Plug-ins by kind and name. Build once; look names up; never call it on the hot path."""

    def __init__(self, *, autoload: bool | None = None, disable: Iterable[str] | None = None) -> None:
        self.pm = pluggy.PluginManager("lqmod")
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        #: Entry points skipped because ``disable`` / LQMOD_DISABLE_PLUGINS named them.
        self.disabled: list[str] = []
        self._disable = frozenset(disable) if disable is not None else _disabled_names(os.environ.get(DISABLE_ENV))
        self._origin: dict[str, str] = {}  # pluggy plugin name -> distribution
        self._cache: dict[str, dict[str, Any]] = {}
        self._clashes: dict[str, dict[str, str]] = {}  # hook -> clashing name -> message
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes"}
        if autoload:
            self._load_entry_points()

    # -- loading -----------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
            name = ep.name
            if ep.name in self._disable or dist in self._disable:
                self.disabled.append(f"{ep.name} ({dist})")
                continue
            if self.pm.has_plugin(name):
                if self._origin.get(name) == dist:
                    continue  # the same distribution seen twice on sys.path
                # Entry-point names are only unique per distribution: a second distribution
                # reusing one must still load (skipping it would hide its registrations and
                # any name clash they cause), so it is registered under a qualified name.
                name = f"{dist}:{ep.name}"
            try:
                plugin = ep.load()
                # Inside the try: pluggy rejects hook implementations that do not match
                # the hookspecs (e.g. a plug-in written for another lqmod version).
                self.register(plugin, name=name, distribution=dist)
            except Exception as exc:  # a broken plug-in must not take lqmod down with it
                self._fail(ep.name, dist, f"{type(exc).__name__}: {exc}", "failed to load and was skipped")

    def _fail(self, plugin: str, dist: str, error: str, what: str) -> None:
        failure = PluginFailure(plugin, dist, error)
        if failure in self.failures:  # the tables are rebuilt after every (un)register
            return
        self.failures.append(failure)
        warnings.warn(
            f"lqmod plug-in {plugin!r} from {dist} {what}: {error} "
            f"(set {DISABLE_ENV}={plugin} to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _check_hook_names(self, plugin: object, name: str) -> None:
        """Refuse hook implementations lqmod has no hookspec for (a misspelled hook name),
        which pluggy would otherwise keep silently and never call."""
        known = sorted(n for n in vars(hookspecs) if n.startswith("lqmod_"))
        for caller in self.pm.get_hookcallers(plugin) or ():
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not impl.optionalhook:
                    close = difflib.get_close_matches(caller.name, known, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise pluggy.PluginValidationError(
                        plugin,
                        f"plug-in {name!r} implements hook {caller.name!r}, which lqmod does not have; "
                        f"{hint}lqmod's hooks are: {', '.join(known)}",
                    )

    def register(self, plugin: object, *, name: str | None = None, distribution: str = "<local>") -> None:
        """Register a plug-in object (module or instance with ``@hookimpl`` functions)."""
        # pluggy would raise a bare ValueError (with its whole plug-in table) for these.
        if name is not None and self.pm.has_plugin(name):
            raise PluginClashError(
                f"plug-in {name!r} from {distribution} is already registered "
                f"(by {self._origin.get(name, '?')})"
            )
        if self.pm.is_registered(plugin):
            raise PluginClashError(
                f"plug-in object {plugin!r} from {distribution} is already registered as "
                f"{self.pm.get_name(plugin)!r}"
            )
        registered = self.pm.register(plugin, name=name)
        if registered is None:  # pluggy returns None for a blocked name
            raise PluginClashError(f"plug-in {name!r} is blocked and cannot be registered")
        try:
            self._check_hook_names(plugin, registered)
        except pluggy.PluginValidationError:
            self.pm.unregister(plugin)
            raise
        self._origin[registered] = distribution
        self._cache.clear()
        self._clashes.clear()

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._cache.clear()
        self._clashes.clear()

    # -- lookup ------------------------------------------------------------------------

    def _collect(self, hook: str, kind: str) -> dict[str, Any]:
        if hook in self._cache:
            return self._cache[hook]
        found: dict[str, Any] = {}
        origin: dict[str, str] = {}
        owner: dict[str, str] = {}  # registration name -> pluggy plug-in name
        clashes: dict[str, str] = {}
        spec_type = _SPEC_TYPES[hook]
        caller = getattr(self.pm.hook, hook)
        # Called impl by impl, not through the hook caller, so each registration is
        # attributed to the distribution that made it (for the clash message), and one
        # plug-in's failure skips that plug-in only.
        for impl in caller.get_hookimpls():
            dist = self._origin.get(impl.plugin_name, impl.plugin_name)
            try:
                specs = list(impl.function() or ())
                wrong = [s for s in specs if not isinstance(s, spec_type)]
                if wrong:
                    raise TypeError(
                        f"{hook} yielded {type(wrong[0]).__name__} {wrong[0]!r:.80}; it must yield "
                        f"lqmod.types.{spec_type.__name__} objects"
                    )
            except Exception as exc:  # one broken hook must not take the others down
                self._fail(impl.plugin_name, dist, f"{type(exc).__name__}: {exc}", f"hook {hook} failed; skipped")
                continue
            for spec in specs:
                where = f"{dist} (plug-in {impl.plugin_name!r})"
                if spec.name in clashes:
                    clashes[spec.name] += f" and by {where}"
                    continue
                if spec.name in found:
                    clashes[spec.name] = (
                        f"{kind} {spec.name!r} is registered twice: by {origin[spec.name]} "
                        f"(plug-in {owner[spec.name]!r}) and by {where}"
                    )
                    del found[spec.name]
                    continue
                found[spec.name] = spec
                origin[spec.name] = dist
                owner[spec.name] = impl.plugin_name
        for name, message in clashes.items():
            # Neither registration is used: picking one silently could run the wrong code.
            full = (f"{message}; neither is used. Uninstall one, or disable one with "
                    f"{DISABLE_ENV}=<entry point or distribution>")
            clashes[name] = full
            failure = PluginFailure(f"{kind} {name!r}", "name clash", full)
            if failure not in self.failures:
                self.failures.append(failure)
                warnings.warn(f"lqmod: {full}", RuntimeWarning, stacklevel=3)
        self._clashes[hook] = clashes
        self._cache[hook] = found
        self._cache[hook + ":origin"] = origin
        return found

    def _get(self, hook: str, kind: str, name: str) -> Any:
        table = self._collect(hook, kind)
        if name in self._clashes.get(hook, {}):
            raise PluginClashError(self._clashes[hook][name])
        if name not in table:
            choices = ", ".join(sorted(table)) or "(none registered)"
            raise UnknownPluginError(f"unknown {kind} {name!r}. Choose one of: {choices}")
        return table[name]

    def quantizers(self) -> dict[str, QuantizerSpec]:
        return dict(self._collect("lqmod_quantizers", "quantizer"))

    def initializers(self) -> dict[str, InitializerSpec]:
        return dict(self._collect("lqmod_initializers", "initializer"))

    def allocators(self) -> dict[str, AllocatorSpec]:
        return dict(self._collect("lqmod_allocators", "allocator"))

    def adapters(self) -> dict[str, AdapterSpec]:
        return dict(self._collect("lqmod_adapters", "adapter"))

    def quantizer(self, name: str) -> QuantizerSpec:
        spec: QuantizerSpec = self._get("lqmod_quantizers", "quantizer", name)
        return spec

    def initializer(self, name: str) -> InitializerSpec:
        spec: InitializerSpec = self._get("lqmod_initializers", "initializer", name)
        return spec

    def allocator(self, name: str) -> AllocatorSpec:
        spec: AllocatorSpec = self._get("lqmod_allocators", "allocator", name)
        return spec

    def adapter(self, name: str) -> AdapterSpec:
        spec: AdapterSpec = self._get("lqmod_adapters", "adapter", name)
        return spec

    def origin(self, kind_hook: str, name: str) -> str:
        self._collect(kind_hook, kind_hook)
        return str(self._cache[kind_hook + ":origin"].get(name, "?"))

    def describe(self) -> list[dict[str, str]]:
        """One row per registration: kind, name, distribution, description."""
        rows: list[dict[str, str]] = []
        kinds: Iterable[tuple[str, str, Callable[[], dict[str, Any]]]] = (
            ("quantizer", "lqmod_quantizers", self.quantizers),
            ("initializer", "lqmod_initializers", self.initializers),
            ("allocator", "lqmod_allocators", self.allocators),
            ("adapter", "lqmod_adapters", self.adapters),
        )
        for kind, hook, get in kinds:
            for name, spec in sorted(get().items()):
                rows.append(
                    {
                        "kind": kind,
                        "name": name,
                        "distribution": self.origin(hook, name),
                        "description": spec.description,
                    }
                )
        return rows


_default: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None or reload:
        _default = Registry()
    return _default
