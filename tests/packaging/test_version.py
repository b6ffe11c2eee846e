"""lqmod's version: one place (pyproject.toml), read back through the distribution metadata."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
from pkgbuild import REPO

import lqmod
from lqmod import _version
from lqmod.bench.report import markdown_tables, write_report
from lqmod.cli import main

tomllib = pytest.importorskip("tomllib")


def _pyproject_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"])


def test_version_comes_from_the_metadata() -> None:
    # A mismatch here means the editable install is older than pyproject.toml: reinstall.
    assert lqmod.__version__ == metadata.version("lqmod") == _pyproject_version()


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"lqmod {lqmod.__version__}\n"


def _not_installed(name: str) -> str:
    raise metadata.PackageNotFoundError(name)


def test_fallback_reads_the_source_trees_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_version.metadata, "version", _not_installed)
    assert _version.lqmod_version() == _pyproject_version()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[project]\nname = "lqmod"\nversion = "9.8.7"\n[tool.x]\nversion = "1"\n', "9.8.7"),
        ('[tool.x]\nversion = "1"\n[project]\nversion = "2.0"\nname = "lqmod"\n', "2.0"),
        ('[project]\nname = "other"\nversion = "1.0"\n', _version.UNKNOWN),  # not lqmod's file
        ('[project]\nname = "lqmod"\ndynamic = ["version"]\n', _version.UNKNOWN),
    ],
)
def test_fallback_parses_only_lqmods_static_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, expected: str
) -> None:
    fake = tmp_path / "src" / "lqmod" / "_version.py"
    fake.parent.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text(text)
    monkeypatch.setattr(_version.metadata, "version", _not_installed)
    monkeypatch.setattr(_version, "__file__", str(fake))
    assert _version.lqmod_version() == expected


def test_fallback_without_any_pyproject(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_version.metadata, "version", _not_installed)
    monkeypatch.setattr(_version, "__file__", str(tmp_path / "site-packages" / "lqmod" / "_version.py"))
    assert _version.lqmod_version() == _version.UNKNOWN


def _results(**extra: object) -> dict:
    return {"model": {"name": "tiny", "kind": "encoder", "n_target_layers": 0},
            "reference": {"metric": "cosine", "value": 1.0}, "rows": [], **extra}


def test_bench_results_record_the_version(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = write_report(_results(), tmp_path)
    assert json.loads(paths["json"].read_text())["lqmod_version"] == lqmod.__version__
    assert f"lqmod {lqmod.__version__}" in paths["md"].read_text().splitlines()[0]
    from PIL import Image

    pngs = [p for p in paths.values() if p.suffix == ".png"]
    assert pngs
    for png in pngs:
        assert Image.open(png).info["Software"] == f"lqmod {lqmod.__version__}"


def test_rewritten_results_keep_the_version_that_produced_them(tmp_path: Path) -> None:
    paths = write_report(_results(lqmod_version="0.0.1"), tmp_path, plots=False)
    assert json.loads(paths["json"].read_text())["lqmod_version"] == "0.0.1"
    assert "lqmod 0.0.1" in markdown_tables(_results(lqmod_version="0.0.1"))
