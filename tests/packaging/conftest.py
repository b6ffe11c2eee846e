"""Session fixtures: lqmod's sdist and wheel (built once per session, see pkgbuild.py) and a tiny Llama."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pkgbuild import Built, build, source_files

TINYLLAMA = Path(__file__).with_name("tinyllama.py")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    files = source_files()
    if files is None:
        pytest.skip("packaging tests build from the git checkout (git or .git missing)")
    return build(files, tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer + train.txt from tinyllama.py: plain files any environment reads."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("lqmod_tests_tinyllama", TINYLLAMA)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out: Path = module.write(tmp_path_factory.mktemp("tinyllama"))
    return out
