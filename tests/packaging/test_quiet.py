"""``import lqmod`` and the ``lqmod`` command print nothing but lqmod's own output.

Optional packages (the benchmark baselines, transformers, triton) are imported only by the
code that uses them; transformers' own import of torchao (when installed) is silenced by the
command line only (src/lqmod/_quiet.py). These run in this, the dev, environment, which has
every optional package installed: the one where an eager import would show.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pkgbuild import noise_lines

from lqmod import _quiet

BASELINES = ("torchao", "bitsandbytes", "hqq", "peft", "gptqmodel")
HEAVY = ("transformers", "huggingface_hub", "triton", "matplotlib", "datasets")

# Prints, per stage, which of the watched packages are in sys.modules.
PROBE = f"""
import json, sys
watched = {list(BASELINES + HEAVY)!r}
seen = {{}}
def mark(stage):
    seen[stage] = sorted(m for m in watched if m in sys.modules)
import lqmod
mark("import lqmod")
from lqmod.cli import build_parser
build_parser()
mark("build_parser")
lqmod.get_registry()
mark("get_registry")
print(json.dumps(seen))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LQMOD_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _run(args: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _lqmod() -> list[str]:
    script = Path(sys.executable).with_name("lqmod")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lqmod"]


def test_import_lqmod_prints_nothing() -> None:
    proc = _run([sys.executable, "-c", "import lqmod"])
    assert (proc.stdout, proc.stderr) == ("", "")


def test_optional_packages_stay_unimported() -> None:
    seen = json.loads(_run([sys.executable, "-c", PROBE]).stdout)
    assert seen["import lqmod"] == [], "import lqmod must stay cheap (lqmod/__init__.py)"
    assert seen["build_parser"] == [], "the CLI's parser must not import optional packages (lazy imports in cli.py)"
    # Loading every plug-in may use what a plug-in needs, but never a benchmark baseline or
    # transformers: `lqmod plugins` must stay fast and quiet.
    assert [m for m in seen["get_registry"] if m in (*BASELINES, "transformers")] == []


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["plugins"]])
def test_cli_prints_only_its_own_output(args: list[str]) -> None:
    proc = _run([*_lqmod(), *args])
    assert proc.stderr == ""
    assert proc.stdout.strip()


def test_quiet_filter_drops_only_the_known_records(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    saved = {name: list(logging.getLogger(name).filters) for name, _ in _quiet.NOISE}
    try:
        _quiet.quiet_third_party()
        _quiet.quiet_third_party()  # idempotent: one filter per record kind
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        with caplog.at_level(logging.WARNING):
            for name, text in _quiet.NOISE:
                log = logging.getLogger(name)
                ours = [f for f in log.filters if isinstance(f, _quiet._DropKnownNoise) and f.text == text]
                assert len(ours) == 1  # also when an earlier test already ran the CLI's main()
                log.warning("x %s y", text)  # dropped
                log.warning("something else from %s", name)  # kept
        assert [r.getMessage() for r in caplog.records] == [f"something else from {n}" for n, _ in _quiet.NOISE]
    finally:
        for name, filters in saved.items():
            logging.getLogger(name).filters[:] = filters


@pytest.mark.slow
def test_quantize_prints_no_third_party_noise(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # Here torchao is installed, so transformers imports it while loading the model.
    proc = _run([*_lqmod(), "quantize", str(tiny_llama_dir), "--quantizer", "nf", "--config", "bits=4,blocksize=64",
                 "--rank", "4", "--out", str(tmp_path / "ckpt")], cwd=tmp_path, timeout=300)
    assert noise_lines(proc.stderr) == []
    assert "quantized" in proc.stdout
