"""Install the wheel as a user would, into a fresh virtual environment outside the repository.

torch first (pinned, as README says: an unpinned torch pulls the CUDA build), then
``lqmod[hf]`` from the wheel under constraints/dev.txt. Nothing from the checkout is visible
there: no PYTHONPATH, the working directory is a temporary folder. In that environment
``lqmod plugins`` lists the built-ins, ``lqmod quantize`` quantizes a tiny random Llama and
one finetune step runs through the Python API (one_step.py); each prints only lqmod's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pkgbuild import REPO, Built, noise_lines

import lqmod

tomllib = pytest.importorskip("tomllib")

# One venv for the module (about a minute to install on 2 idle cores); each command takes seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Venv:
    root: Path
    workdir: Path  # outside the repository: nothing there to import by accident
    env: dict[str, str]

    def run(self, args: Sequence[str | Path], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def lqmod(self) -> Path:
        return self.root / "bin" / "lqmod"


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.args} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    if sys.platform == "win32":
        pytest.skip("the clean-install test uses a POSIX venv layout")
    root = tmp_path_factory.mktemp("clean-venv")
    workdir = tmp_path_factory.mktemp("clean-cwd")
    assert REPO not in root.parents and REPO not in workdir.parents
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LQMOD_")}
    env.update(PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    v = Venv(root / "venv", workdir, env)
    _ok(subprocess.run([sys.executable, "-m", "venv", str(v.root)], capture_output=True, text=True, timeout=120))
    # --no-compile: byte-compiling all of torch costs more CPU than the few modules imported here.
    pip: list[str | Path] = [v.python, "-m", "pip", "install", "--quiet", "--no-compile"]
    _ok(v.run([*pip, "torch==2.13.0"], timeout=600))
    _ok(v.run([*pip, "-c", REPO / "constraints" / "dev.txt", f"lqmod[hf] @ {built.wheel.as_uri()}"], timeout=600))
    return v


def test_import_and_plugins_come_from_the_wheel(venv: Venv) -> None:
    code = (
        "import json, lqmod; r = lqmod.get_registry(); "
        "print(json.dumps([lqmod.__file__, lqmod.__version__, r.describe(), len(r.failures)]))"
    )
    proc = _ok(venv.run([venv.python, "-c", code]))
    assert proc.stderr == ""
    path, version, rows, failures = json.loads(proc.stdout)
    assert venv.root in Path(path).parents, f"lqmod imported from {path}, not from the clean venv"
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert failures == 0
    # The same built-ins as this checkout registers from its own distribution (the dev
    # environment also has the example plug-in, which the wheel must not bring).
    here = {(r["kind"], r["name"]) for r in lqmod.get_registry().describe() if r["distribution"] == "lqmod"}
    assert {(r["kind"], r["name"]) for r in rows} == here
    assert {r["distribution"] for r in rows} == {"lqmod"}

    proc = _ok(venv.run([venv.lqmod, "plugins"]))
    assert proc.stderr == "" and "failed to load" not in proc.stdout
    for _, name in here:
        assert name in proc.stdout


def test_quantize_then_one_finetune_step(venv: Venv, tiny_llama_dir: Path) -> None:
    ckpt = venv.workdir / "ckpt"
    proc = _ok(venv.run([venv.lqmod, "quantize", tiny_llama_dir, "--quantizer", "nf",
                         "--config", "bits=4,blocksize=64", "--rank", "4", "--out", ckpt]))
    assert "quantized" in proc.stdout and str(ckpt) in proc.stdout
    assert noise_lines(proc.stderr) == []
    layers = json.loads((ckpt / "lqmod.json").read_text())["layers"]
    # 2 decoder layers x 7 projections (q, k, v, o, gate, up, down); lm_head stays dense.
    assert len(layers) == 14 and all(h["quantizer"] == "nf" for h in layers.values())

    proc = _ok(venv.run([venv.python, HERE / "one_step.py", ckpt, tiny_llama_dir, venv.workdir / "ckpt-ft"]))
    assert proc.stdout.startswith("one step: loss")
    assert (venv.workdir / "ckpt-ft" / "lqmod.json").is_file()
