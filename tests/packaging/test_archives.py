"""The wheel and the sdist hold exactly lqmod and its built-in plug-ins (docs/packaging.md).

What is expected is derived from the source tree and pyproject.toml, then checked both ways:
nothing missing (every module, the declared data) and nothing extra (no stray folder such as
the example plug-in's sources, no tests, no READMEs in the wheel, no caches).
"""

from __future__ import annotations

import configparser
import email.parser
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from pkgbuild import Built

tomllib = pytest.importorskip("tomllib")

pytestmark = pytest.mark.slow  # two setuptools builds (~10 s), shared by this module

# Non-Python files in the packages and what becomes of them. A new data file must be added
# here and, if the code reads it, to [tool.setuptools.package-data].
SHIPPED_DATA = {"src/lqmod/py.typed", "src/lqmod/kernels/native/lut_cpu.c"}
DOC_ONLY = {"README.md"}  # per-plug-in docs: in the sdist, not in the wheel


def _pyproject(built: Built) -> dict:
    return tomllib.loads((built.source / "pyproject.toml").read_text(encoding="utf-8"))


def _plugin_packages(source: Path) -> set[str]:
    """plugins/<name>/ folders that are import packages: the built-in plug-ins."""
    return {p.parent.name for p in (source / "plugins").glob("*/__init__.py")}


def _package_files(source: Path) -> dict[str, str]:
    """Wheel path -> source path for every file the wheel must hold."""
    out: dict[str, str] = {}
    roots = [(source / "src" / "lqmod", "lqmod")] + [
        (source / "plugins" / name, name) for name in _plugin_packages(source)
    ]
    for root, top in roots:
        for f in sorted(root.rglob("*")):
            if not f.is_file() or "__pycache__" in f.parts or f.suffix in (".pyc", ".so"):
                continue
            rel_src = f.relative_to(source).as_posix()
            if f.suffix == ".py" or rel_src in SHIPPED_DATA:
                out[f"{top}/{f.relative_to(root).as_posix()}"] = rel_src
            else:
                assert f.name in DOC_ONLY, (
                    f"{rel_src} is neither a module nor declared data: add it to SHIPPED_DATA here and to "
                    "[tool.setuptools.package-data] if the code reads it, or to DOC_ONLY if it is documentation"
                )
    return out


def test_every_package_folder_has_an_init(built: Built) -> None:
    # Discovery is namespaces=false: a sub-folder without __init__.py would silently be left out.
    roots = [built.source / "src" / "lqmod"] + [built.source / "plugins" / n for n in _plugin_packages(built.source)]
    for root in roots:
        for d in [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            if any(d.glob("*.py")) or any(c.is_dir() and c.name != "__pycache__" for c in d.iterdir()):
                assert (d / "__init__.py").is_file(), f"{d.relative_to(built.source)} has no __init__.py"


@pytest.mark.parametrize("which", ["from sdist", "from tree"])
def test_wheel_holds_exactly_lqmod_and_the_builtin_plugins(built: Built, which: str) -> None:
    wheel = built.wheels()[which]
    version = _pyproject(built)["project"]["version"]
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"lqmod-{version}.dist-info"
    assert wheel.name == f"lqmod-{version}-py3-none-any.whl"

    plugins = _plugin_packages(built.source)
    tops = {PurePosixPath(n).parts[0] for n in names}
    assert tops == {"lqmod", dist_info, *plugins}, "unexpected top-level entries in the wheel"
    assert not any("example" in n or n.startswith("tests/") or n.endswith(".md") for n in names)

    expected = _package_files(built.source)
    package_names = {n for n in names if not n.startswith(dist_info + "/")}
    assert sorted(package_names - set(expected)) == [], "files in the wheel that are not lqmod's"
    assert sorted(set(expected) - package_names) == [], "files missing from the wheel"
    assert "lqmod/py.typed" in names
    assert {n.split("/", 1)[1] for n in names if n.startswith(dist_info + "/")} == {
        "METADATA", "WHEEL", "entry_points.txt", "top_level.txt", "RECORD",
    }


def test_wheel_metadata_and_entry_points(built: Built) -> None:
    project = _pyproject(built)["project"]
    z = zipfile.ZipFile(built.wheel)
    dist_info = f"lqmod-{project['version']}.dist-info"
    meta = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
    assert (meta["Name"], meta["Version"]) == ("lqmod", project["version"])
    assert meta["License-Expression"] == "Apache-2.0"

    eps = configparser.ConfigParser(delimiters=("=",))
    eps.optionxform = str  # type: ignore[assignment,method-assign]  # keep names' case
    eps.read_string(z.read(f"{dist_info}/entry_points.txt").decode())
    assert dict(eps["console_scripts"]) == {"lqmod": "lqmod.cli:main"}
    group = dict(eps["lqmod"])
    assert group == project["entry-points"]["lqmod"]
    # Built-ins load through the entry-point group like third-party plug-ins: every plug-in
    # package is announced, and every announced module is in the wheel.
    assert {v.split(":")[0].split(".")[0] for v in group.values()} == _plugin_packages(built.source)
    top_level = set(z.read(f"{dist_info}/top_level.txt").decode().split())
    assert top_level == {"lqmod", *_plugin_packages(built.source)}


def test_sdist_holds_the_sources_readmes_and_docs_only(built: Built) -> None:
    version = _pyproject(built)["project"]["version"]
    root = f"lqmod-{version}"
    with tarfile.open(built.sdist) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    rel = {n.removeprefix(root + "/") for n in names}
    assert all(n.startswith(root + "/") for n in names)

    tops = {PurePosixPath(n).parts[0] for n in rel}
    assert tops == {"PKG-INFO", "setup.cfg", "README.md", "pyproject.toml", "MANIFEST.in", "docs", "src", "plugins",
                    "lqmod.egg-info"}
    assert {PurePosixPath(n).parts[1] for n in rel if n.startswith("plugins/")} == _plugin_packages(built.source)
    assert not any("__pycache__" in n or n.endswith((".pyc", ".so")) for n in rel)

    # Every file of the packages (modules, data, plug-in READMEs) and every guide in docs/.
    want = {src for src in _package_files(built.source).values()}
    want |= {p.relative_to(built.source).as_posix() for p in (built.source / "plugins").glob("*/README.md")
             if p.parent.name in _plugin_packages(built.source)}
    want |= {p.relative_to(built.source).as_posix() for p in (built.source / "docs").glob("*.md")}
    sources = {n for n in rel if n.startswith(("src/lqmod/", "plugins/", "docs/"))}
    assert sorted(want - sources) == [], "files missing from the sdist"
    assert sorted(sources - want) == [], "files in the sdist that MANIFEST.in does not mean to ship"
