"""PEFT over lqmod layers trains under transformers.Trainer (gradient checkpointing too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from integ_helpers import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lqmod.integrations.peft as lqpeft  # noqa: E402
from lqmod.integrations.base import quantize_linears  # noqa: E402
from lqmod.nn import QuantizedLinear  # noqa: E402


@pytest.mark.parametrize("use_dora", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["lora", "dora"])
def test_trainer_lowers_the_loss_and_leaves_the_base_alone(tmp_path: Path, use_dora: bool) -> None:
    model = tiny_llama(1)
    quantize_linears(model, "nf", {"bits": 4, "blocksize": 64})
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=lqpeft.target_modules(model), use_dora=use_dora)
    )
    codes = {n: b.clone() for n, b in pm.named_buffers() if n.endswith("codes")}
    g = torch.Generator().manual_seed(0)
    # One repeated batch of 4 sequences: the loss it reaches shows the adapters learn.
    seqs = torch.randint(0, 101, (4, 16), generator=g)
    data = [{"input_ids": s, "labels": s} for s in seqs]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, activation_checkpointing=True, seed=0,
    )
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert losses[-1] < 0.9 * losses[0], losses
    for n, b in pm.named_buffers():
        if n in codes:
            assert torch.equal(b, codes[n]), f"{n} changed: the quantized base must stay frozen"
    assert sum(isinstance(m, QuantizedLinear) for m in pm.modules()) == 7


@pytest.mark.slow
def test_trl_sft_trainer_over_peft_on_lqmod_layers(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from integ_helpers import save_word_tokenizer

    text = save_word_tokenizer(tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = tiny_llama(1)
    quantize_linears(model, "nf", {"bits": 4, "blocksize": 64})
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=lqpeft.target_modules(model)))
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    ds = datasets.Dataset.from_dict({"text": text.read_text().splitlines()})
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        max_length=16, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataset_num_proc=None,
    )
    out = trl.SFTTrainer(model=pm, args=cfg, train_dataset=ds, processing_class=tokenizer).train()
    assert out.global_step == 3
    moved = [n for n, p in pm.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)


def test_galore_for_the_full_rank_modules_beside_the_adapters(tmp_path: Path) -> None:
    """modules_to_save (the LM head) trains in full rank with GaLore's projected Adam, the
    adapters with plain Adam, the quantized base not at all."""
    pytest.importorskip("galore_torch", reason="galore-torch is not installed (pip install 'lqmod[galore]')")
    model = tiny_llama(1)
    quantize_linears(model, "nf", {"bits": 4, "blocksize": 64})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=lqpeft.target_modules(model), modules_to_save=["lm_head"])
    pm = peft.get_peft_model(model, lora)
    head = "base_model.model.lm_head.modules_to_save.default"
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    codes = {n: b.clone() for n, b in pm.named_buffers() if n.endswith("codes")}
    seqs = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, optim="galore_adamw", optim_target_modules=[head],
        optim_args="rank=4, update_proj_gap=4, scale=0.25",
    )
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=[{"input_ids": s, "labels": s} for s in seqs])
    trainer.train()
    galore_groups = [g for g in trainer.optimizer.param_groups if "rank" in g]
    assert len(galore_groups) == 1 and galore_groups[0]["rank"] == 4
    assert [id(p) for p in galore_groups[0]["params"]] == [id(pm.get_parameter(head + ".weight"))]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    after = dict(pm.named_parameters())
    assert not torch.equal(after[head + ".weight"], before[head + ".weight"])
    assert torch.equal(after["base_model.model.lm_head.original_module.weight"],
                       before["base_model.model.lm_head.original_module.weight"])
    assert any(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)
    for n, b in pm.named_buffers():
        if n in codes:
            assert torch.equal(b, codes[n])
