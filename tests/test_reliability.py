"""Issue 12: no silently wrong checkpoint, no lost work, one clear line for bad input.

Each test reproduces one finding of the issue; on the code before the fix it fails.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lqmod
import lqmod.io as lio
from lqmod.config import ConfigError, QuantizerConfig
from lqmod.model import iter_lora_layers, quantize_model
from lqmod.quantize import QuantizationError
from lqmod.types import QuantizedWeight, QuantizerSpec

SRC = Path(__file__).resolve().parents[1] / "src"


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def _quantized(config: dict[str, Any] | None = None) -> nn.Module:
    model = _tiny()
    quantize_model(model, "nf", config or {"blocksize": 32}, lora={"r": 2}, progress=False)
    g = torch.Generator().manual_seed(1)
    for _, layer in iter_lora_layers(model):
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model


def _edit(path: Path, change: Any, *, resign: bool) -> None:
    """Apply ``change(manifest)`` to a checkpoint's manifest; ``resign`` recomputes its hashes,
    as a tool that edits manifests consistently would, so only the deeper checks remain."""
    mpath = path / "lqmod.json"
    manifest = json.loads(mpath.read_text())
    change(manifest)
    if resign:
        body = {k: v for k, v in manifest.items() if k != "integrity"}
        manifest["integrity"] = {
            "algorithm": "sha256",
            "layers": {n: lio._digest(h) for n, h in body["layers"].items()},
            "manifest": lio._digest(body),
        }
    mpath.write_text(json.dumps(manifest))


def _set(path: list[str], value: Any) -> Any:
    def change(m: dict[str, Any]) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


# -- silently wrong checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3])
def test_edited_bits_in_the_manifest_is_refused_naming_the_layer(bits: int, tmp_path: Path) -> None:
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    _edit(tmp_path / "c", _set(["layers", "2", "config", "bits"], bits), resign=False)
    with pytest.raises(lio.CheckpointError, match=r"layer '2'.*SHA-256"):
        lio.load_checkpoint(tmp_path / "c", model=_tiny())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bits", 2, "does not match its config"),
        ("bits", 3, "does not match its config"),
        ("bits", 7, "Input should be 2, 3 or 4"),
        ("blocksize", 64, "does not match its config"),
        ("double_quant", False, "does not match its config"),
        ("dq_blocksize", 16, "does not match its config"),
    ],
)
def test_a_consistently_edited_config_is_refused_by_the_quantizer(
    field: str, value: Any, message: str, tmp_path: Path
) -> None:
    # Even with the hashes recomputed, nf's validate hook (and the core's exact-bits check)
    # refuses tensors that the config does not describe, naming the layer, at load time.
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    _edit(tmp_path / "c", _set(["layers", "0", "config", field], value), resign=True)
    with pytest.raises(lio.CheckpointError, match=rf"layer '0'.*{message}"):
        lio.load_checkpoint(tmp_path / "c", model=_tiny())


def _stats() -> dict[str, lqmod.LayerStats]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64)
    return {n: lqmod.LayerStats(hessian=x.T @ x, n_tokens=256) for n in ("0", "2")}


@pytest.mark.parametrize(
    ("quantizer", "config", "edit", "value"),
    [
        ("nf", {"bits": 4, "blocksize": 32}, ["bits"], 3),
        ("optq", {"bits": 4, "group_size": 32}, ["bits"], 3),
        ("optq", {"bits": 4, "group_size": 32}, ["group_size"], 64),
        ("optq", {"bits": 4, "group_size": 32, "sym": False}, ["sym"], True),
        ("quip", {"bits": 2}, ["bits"], 4),
        ("rtn", {"bits": 4, "group_size": 32}, ["bits"], 5),
        ("rtn", {"bits": 4, "group_size": 32}, ["scale_dtype"], "float32"),
        ("lq", {"rank": 4, "max_iters": 2}, ["base_config", "bits"], 2),
        ("lq", {"rank": 4, "max_iters": 2}, ["rank"], 3),
        ("lq", {"rank": 4, "max_iters": 2}, ["factor_dtype"], "bf16"),
    ],
)
def test_every_builtin_validate_hook_refuses_an_edited_config(
    quantizer: str, config: dict[str, Any], edit: list[str], value: Any, tmp_path: Path
) -> None:
    model = _tiny()
    quantize_model(model, quantizer, config, lora={"r": 2}, stats=_stats(), progress=False)
    lio.save_checkpoint(model, tmp_path / "c")
    assert isinstance(lio.load_checkpoint(tmp_path / "c", model=_tiny()).get_submodule("0"), lqmod.LoRALinear)
    _edit(tmp_path / "c", _set(["layers", "2", "config", *edit], value), resign=True)
    spec = lqmod.get_registry().quantizer(quantizer)
    assert spec.validate is not None
    with pytest.raises(lio.CheckpointError, match=r"layer '2'.*(does not match its config|bits/param)"):
        lio.load_checkpoint(tmp_path / "c", model=_tiny())


def test_any_other_manifest_edit_is_refused(tmp_path: Path) -> None:
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    _edit(tmp_path / "c", _set(["lora", "alpha"], 1000.0), resign=False)
    with pytest.raises(lio.CheckpointError, match="does not match its SHA-256"):
        lio.load_checkpoint(tmp_path / "c", model=_tiny())


def test_a_checkpoint_records_the_lqmod_version_and_integrity(tmp_path: Path) -> None:
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "lqmod.json").read_text())
    assert manifest["lqmod_version"] == lqmod.__version__
    assert set(manifest["integrity"]["layers"]) == set(manifest["layers"]) == {"0", "2"}
    assert lio.read_manifest(tmp_path / "c")["version"] == 3


def test_a_version_1_checkpoint_without_integrity_still_loads(tmp_path: Path) -> None:
    model = _quantized()
    lio.save_checkpoint(model, tmp_path / "c")

    def as_v1(m: dict[str, Any]) -> None:
        m["version"] = 1
        del m["integrity"], m["lqmod_version"]

    _edit(tmp_path / "c", as_v1, resign=False)
    loaded = lio.load_checkpoint(tmp_path / "c", model=_tiny())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # The quantizers' checks still apply to old checkpoints.
    _edit(tmp_path / "c", _set(["layers", "0", "config", "bits"], 2), resign=False)
    with pytest.raises(lio.CheckpointError, match=r"layer '0'.*does not match its config"):
        lio.load_checkpoint(tmp_path / "c", model=_tiny())


def test_a_quantizer_that_materializes_inf_is_refused() -> None:
    # Per-row absmax scales stored in float16 without a check: weights of 1e6 overflow them.
    def quantize(w: torch.Tensor, cfg: QuantizerConfig, stats: object) -> QuantizedWeight:
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        codes = torch.round(w / scale).to(torch.int8)
        rows, cols = w.shape
        return QuantizedWeight("fp16-absmax", cfg.model_dump(), (rows, cols),
                               {"codes": codes, "scale": scale.to(torch.float16)})

    def materialize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return (qw.tensors["codes"].float() * qw.tensors["scale"].float()).to(dtype)

    spec = QuantizerSpec("fp16-absmax", QuantizerConfig, quantize, materialize,
                         bits_per_param=lambda cfg, shape: 8 + 16 / shape[1])
    w = torch.randn(8, 16) * 1e7
    with pytest.raises(QuantizationError, match=r"materializes .* non-finite value"):
        lqmod.quantize_weight(spec, w)
    registry = lqmod.Registry(autoload=True)

    class Plugin:
        @lqmod.hookimpl
        def lqmod_quantizers(self) -> list[QuantizerSpec]:
            return [spec]

    registry.register(Plugin(), name="fp16-absmax")
    linear = nn.Linear(16, 8)
    model = nn.Sequential(linear)
    with torch.no_grad():
        linear.weight.mul_(1e9)
    with pytest.raises(QuantizationError, match=r"^0: quantizer 'fp16-absmax' .* non-finite"):
        quantize_model(model, "fp16-absmax", registry=registry, progress=False)


def test_rel_error_of_huge_finite_weights_is_finite() -> None:
    linear = nn.Linear(64, 32)
    model = nn.Sequential(linear)
    weight = (torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 1e38
    with torch.no_grad():
        linear.weight.copy_(weight)
    report = quantize_model(model, "nf", {"blocksize": 64, "double_quant": False}, progress=False)
    err = report.layers[0].rel_error
    # The same ratio in float64 (a float32 norm of 1e38-sized entries is inf, and inf/inf NaN).
    layer = model[0]
    assert isinstance(layer, lqmod.LoRALinear)
    dense = layer.dense_weight(torch.float32).double()
    ref = float((dense - weight.double()).norm() / weight.double().norm())
    assert math.isfinite(err) and 0.0 < err < 0.2
    assert err == pytest.approx(ref, rel=1e-9)


def test_quantize_model_failing_at_a_later_layer_leaves_the_model_unchanged() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(48, 32))  # 48: no 64-blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(QuantizationError, match=r"^2: in_features=48 is not a multiple of blocksize=64"):
        quantize_model(model, "nf", {"blocksize": 64}, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [p.requires_grad for p in model.parameters()] == flags
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- files on disk ----------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_checkpoint_permissions_follow_the_umask(umask: int, dir_mode: int, file_mode: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        lio.save_checkpoint(_quantized(), tmp_path / "c")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == dir_mode
    for f in ("lqmod.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "c" / f).stat().st_mode) == file_mode, f


def test_identical_models_give_byte_identical_checkpoints(tmp_path: Path) -> None:
    model = _quantized()
    digests = set()
    for i in range(8):  # safetensors' metadata order used to change from one save to the next
        lio.save_checkpoint(model, tmp_path / f"c{i}")
        digests.add(tuple(hashlib.sha256((tmp_path / f"c{i}" / f).read_bytes()).hexdigest()
                          for f in ("model.safetensors", "lqmod.json")))
    assert len(digests) == 1


_KILLER = """
import os, signal, sys
from pathlib import Path
import torch
from torch import nn
sys.path.insert(0, {src!r})
import lqmod.io as lio
import lqmod.io.save as lsave
from lqmod.model import quantize_model
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
quantize_model(model, "nf", {{"blocksize": 32}}, lora={{"r": 2}}, progress=False)
mode = sys.argv[1]
if mode == "during-write":
    real = lsave.write_safetensors  # the name save_checkpoint calls
    def dying(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    lsave.write_safetensors = dying
elif mode == "between-renames":
    real_rename = Path.rename
    def rename(self, target):
        if ".tmp-" in self.name:  # the second rename of an overwrite: new copy -> target
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(self, target)
    Path.rename = rename
lio.save_checkpoint(model, sys.argv[2], overwrite=True, extra={{"run": "new"}})
"""


def _run_killed(mode: str, target: Path, tmp_path: Path) -> None:
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(_KILLER.format(src=str(SRC))))
    proc = subprocess.run([sys.executable, str(script), mode, str(target)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_a_save_killed_while_writing_leaves_nothing_after_the_next_save(tmp_path: Path) -> None:
    target = tmp_path / "c"
    _run_killed("during-write", target, tmp_path)
    assert any(".c.tmp-" in n for n in _hidden(tmp_path))  # what SIGKILL leaves
    assert not target.exists()
    lio.save_checkpoint(_quantized(), target)
    assert _hidden(tmp_path) == []


@pytest.mark.slow
def test_an_overwrite_killed_between_its_renames_is_finished_by_the_next_load(tmp_path: Path) -> None:
    target = tmp_path / "c"
    lio.save_checkpoint(_quantized(), target, extra={"run": "old"})
    _run_killed("between-renames", target, tmp_path)
    assert not target.exists()  # the crash window: old and new copies both hidden
    model = lio.load_checkpoint(target, model=_tiny())
    assert isinstance(model.get_submodule("0"), lqmod.LoRALinear)
    assert lio.read_manifest(target)["extra"] == {"run": "new"}  # the overwrite was completed
    assert _hidden(tmp_path) == []


def test_a_live_process_temporaries_are_left_alone(tmp_path: Path) -> None:
    live = tmp_path / f".c.tmp-{os.getpid()}-0badf00d"
    live.mkdir()
    dead = tmp_path / ".c.tmp-999999999-0badf00d"  # no such pid
    dead.mkdir()
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    assert live.exists() and not dead.exists()


# -- one clear line for bad input -------------------------------------------------------------


def test_manifest_that_is_a_json_list_is_one_clear_error(tmp_path: Path) -> None:
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    (tmp_path / "c" / "lqmod.json").write_text("[1, 2, 3]")
    with pytest.raises(lio.CheckpointError, match="must hold a JSON object, not a JSON list"):
        lio.load_checkpoint(tmp_path / "c", model=_tiny())


def test_manifest_shape_that_is_not_a_number_is_one_clear_error(tmp_path: Path) -> None:
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    _edit(tmp_path / "c", _set(["layers", "0", "shape"], ["a", 64]), resign=True)
    with pytest.raises(lio.CheckpointError, match=r"layer '0'.*shape must be 2-D.*\['a', 64\]"):
        lio.load_checkpoint(tmp_path / "c", model=_tiny())


@pytest.mark.parametrize("cls", ["AutoConfig", "PreTrainedModel", "NoSuchModel", 42])
def test_manifest_naming_an_unexpected_model_class_is_one_clear_error(
    cls: Any, tiny_llama: nn.Module, tmp_path: Path
) -> None:
    quantize_model(tiny_llama, "nf", {"blocksize": 32}, lora={"r": 2}, progress=False)
    lio.save_checkpoint(tiny_llama, tmp_path / "c")
    _edit(tmp_path / "c", _set(["model", "class"], cls), resign=True)
    with pytest.raises(lio.CheckpointError, match=re.escape(str(cls))):
        lio.load_checkpoint(tmp_path / "c")


def test_quantize_model_with_a_config_string_says_what_it_needs() -> None:
    with pytest.raises(ConfigError, match=r"config must be a mapping.*got str 'bits=4'.*\{'bits': 4\}"):
        quantize_model(_tiny(), "nf", config="bits=4", progress=False)


def test_quantize_weight_takes_a_registered_name() -> None:
    w = torch.randn(16, 64)
    qw = lqmod.quantize_weight("nf", w, {"blocksize": 32})
    assert qw.quantizer == "nf" and qw.shape == (16, 64)
    with pytest.raises(TypeError, match=r"registered name .* or a QuantizerSpec, got int"):
        lqmod.quantize_weight(4, w)  # type: ignore[arg-type]
    with pytest.raises(lqmod.UnknownPluginError, match="Choose one of"):
        lqmod.quantize_weight("nf9", w)


def test_a_model_folder_with_only_a_pickle_says_safetensors_only(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from lqmod.cli import main
    from lqmod.hf import load_local_model

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin .*lqmod loads safetensors weights only"):
        load_local_model(str(folder))
    assert main(["quantize", str(folder), "--out", str(tmp_path / "q")]) == 2
    out = capsys.readouterr().out.strip()
    assert "safetensors weights only" in out and "\n" not in out


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch, tiny_llama: nn.Module, tmp_path: Path) -> dict[str, int]:
    """``lqmod quantize`` on a tiny Llama instead of a real model; counts the loads."""
    import lqmod.hf
    from lqmod.hf import LocalModel

    calls = {"load": 0}

    def load(name: str, **kwargs: Any) -> tuple[nn.Module, None, LocalModel]:
        calls["load"] += 1
        return tiny_llama, None, LocalModel("tiny", tmp_path, kind="causal-lm")

    monkeypatch.setattr(lqmod.hf, "load_local_model", load)
    return calls


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from lqmod.cli import main

    code = main(args)
    return code, capsys.readouterr().out.strip()


def test_quantize_refuses_an_existing_out_before_any_work(
    fake_model: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "q").mkdir()
    code, out = _cli(["quantize", "tiny", "--config", "blocksize=32", "--out", str(tmp_path / "q")], capsys)
    assert code == 2 and "exists; pass --overwrite" in out
    assert fake_model["load"] == 0  # refused before the model was even loaded


def test_alpha_zero_is_refused_and_alpha_is_respected(
    fake_model: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _cli(["quantize", "tiny", "--rank", "2", "--alpha", "0", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--alpha 0: alpha must be a positive number" in out and "\n" not in out
    assert fake_model["load"] == 0
    args = ["quantize", "tiny", "--config", "blocksize=32", "--rank", "2", "--include", "mlp"]
    code, out = _cli([*args, "--alpha", "3", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, out
    assert lio.read_manifest(tmp_path / "b")["lora"]["alpha"] == 3.0


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--rank", "0"], "--rank 0: the LoRA rank must be a positive integer"),
        (["--alpha", "nan"], "--alpha nan: alpha must be a positive number"),
        (["--include", "["], "'[' is not a valid regular expression: unterminated character set"),
    ],
)
def test_bad_quantize_options_are_one_line(
    extra: list[str], expected: str, fake_model: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _cli(["quantize", "tiny", *extra, "--out", str(tmp_path / "q")], capsys)
    assert code == 2
    assert expected in out and "\n" not in out, out
    assert fake_model["load"] == 0


@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--lr", "nan")])
def test_bad_finetune_options_are_one_line(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lio.save_checkpoint(_quantized(), tmp_path / "c")
    code, out = _cli(["finetune", str(tmp_path / "c"), "--base", "minilm", flag, value,
                      "--out", str(tmp_path / "ft")], capsys)
    assert code == 2 and "\n" not in out, out
    assert f"field {flag.removeprefix('--')!r} = " in out


def test_a_pydantic_error_from_any_command_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # --steps 0 / --lr nan reach a pydantic model inside the command: main() prints one line.
    from pydantic import Field

    import lqmod.cli as cli
    from lqmod.config import FrozenModel

    class Steps(FrozenModel):
        steps: int = Field(1, ge=1)
        lr: float = Field(1e-3, gt=0, allow_inf_nan=False)

    def command(args: Any) -> int:
        Steps(steps=0, lr=float("nan"))
        return 0

    monkeypatch.setattr(cli, "_cmd_plugins", command)
    code, out = _cli(["plugins"], capsys)
    assert code == 2 and "\n" not in out
    assert "field 'steps' = 0: Input should be greater than or equal to 1" in out
    assert "field 'lr' = nan" in out


def test_a_plugin_clash_is_one_line_when_the_name_is_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import lqmod.cli as cli

    def command(args: Any) -> int:
        raise lqmod.PluginClashError("quantizer 'nf' is registered twice: by lqmod (plug-in 'nf') and by x")

    monkeypatch.setattr(cli, "_cmd_plugins", command)
    code, out = _cli(["plugins"], capsys)
    assert code == 2 and "registered twice" in out
