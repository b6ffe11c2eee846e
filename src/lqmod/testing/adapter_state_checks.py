"""The adapter contract's checks of state dicts, checkpoints and PEFT export."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lqmod.nn.lora_linear import LoRALinear
from lqmod.testing.adapter_base import AdapterContractBase
from lqmod.types import AdapterSpec


class AdapterStateChecks(AdapterContractBase):
    """State-dict round trips, checkpoints that record and restore the variant, PEFT export."""

    # -- state, checkpoints, PEFT ------------------------------------------------------------

    def test_state_dict_round_trip(self, spec: AdapterSpec, config: dict[str, Any]) -> None:
        layer = self.make_layer(spec, config)
        fresh = self.make_layer(spec, config, trained=False)
        fresh.load_state_dict(layer.state_dict())
        x = self.make_input()
        with torch.no_grad():
            assert torch.equal(fresh(x), layer(x)), "a layer loading the state dict computes something else"
        if spec.validate is not None:
            spec.validate(fresh.adapter)
            with torch.no_grad():
                next(iter(fresh.adapter.parameters())).view(-1)[0] = float("nan")
            with pytest.raises(ValueError, match=r"non-finite|nan|NaN|finite"):
                spec.validate(fresh.adapter)

    def test_checkpoint_records_and_restores_the_variant(
        self, spec: AdapterSpec, config: dict[str, Any], tmp_path: Path
    ) -> None:
        from lqmod.io import load_checkpoint, read_manifest, save_checkpoint

        layer = self.make_layer(spec, config)
        model = nn.Sequential(layer)
        save_checkpoint(model, tmp_path / "ckpt")
        header = read_manifest(tmp_path / "ckpt")["layers"]["0"]
        assert header["adapter"] == spec.name
        assert spec.config_model.model_validate(header["adapter_config"]) == layer.adapter_config
        skeleton = nn.Sequential(nn.Linear(self.shape[1], self.shape[0]))
        loaded = load_checkpoint(tmp_path / "ckpt", model=skeleton, registry=self.make_registry(spec))
        back = loaded.get_submodule("0")
        assert isinstance(back, LoRALinear) and back.adapter_name == spec.name
        assert type(back.adapter) is type(layer.adapter)
        x = self.make_input()
        with torch.no_grad():
            assert torch.equal(back(x), layer.eval()(x)), "the reloaded layer computes something else"
        assert {n for n, p in back.named_parameters() if p.requires_grad} == {
            n for n, p in layer.named_parameters() if p.requires_grad
        }

    def test_peft_export(self, spec: AdapterSpec, config: dict[str, Any], tmp_path: Path) -> None:
        from lqmod.io import dequantized_copy, export_peft

        layer = self.make_layer(spec, config).eval()
        model = nn.Sequential(layer)
        if spec.peft is None:
            with pytest.raises(ValueError, match=rf"PEFT cannot load the '{spec.name}' adapter variant"):
                export_peft(model, tmp_path / "peft")
            return
        peft = pytest.importorskip("peft")
        export_peft(model, tmp_path / "peft")
        dense = dequantized_copy(model)
        loaded = peft.PeftModel.from_pretrained(dense, str(tmp_path / "peft")).eval()
        x = self.make_input()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), layer(x), rtol=1e-5, atol=1e-6)

    def test_spec_is_a_frozen_dataclass(self, spec: AdapterSpec) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "other"  # type: ignore[misc]
