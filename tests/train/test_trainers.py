"""An lqmod-quantized model trains unchanged under transformers.Trainer and TRL's SFTTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from lqmod.train import Record, pack_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

transformers = pytest.importorskip("transformers")


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    adapters = {n: t for n, t in state.items() if "lora_" in n}
    return adapters, {n: t for n, t in state.items() if n not in adapters}


def _moved_adapters_only(model: torch.nn.Module, before: tuple[dict[str, torch.Tensor], ...]) -> None:
    adapters, frozen = _snapshot(model)
    assert sum(not torch.equal(adapters[n], before[0][n]) for n in adapters) >= len(adapters) // 2
    changed = [n for n in frozen if not torch.equal(frozen[n], before[1][n])]
    assert not changed, f"frozen tensors moved: {changed[:5]}"


def test_transformers_trainer_trains_the_adapters(
    quantized_llama: torch.nn.Module, word_tokenizer: PreTrainedTokenizerFast, train_text: str, tmp_path: Path
) -> None:
    data = pack_records(word_tokenizer, [Record(train_text)], 16)
    rows = [{"input_ids": x, "labels": y} for x, y in zip(data.input_ids, data.labels, strict=True)]
    before = _snapshot(quantized_llama)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=1, gradient_accumulation_steps=2, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=quantized_llama, args=args, train_dataset=rows)
    out = trainer.train()
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    _moved_adapters_only(quantized_llama, before)
    # The optimizer Trainer built holds exactly the adapters.
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(t.numel() for t in before[0].values())


def test_trl_sft_trainer_trains_the_adapters(
    quantized_llama: torch.nn.Module, word_tokenizer: PreTrainedTokenizerFast, train_text: str, tmp_path: Path
) -> None:
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'lqmod[train]')")
    datasets = pytest.importorskip("datasets")
    sentences = [s.strip() + " ." for s in train_text.split(" . ") if s.strip()]
    ds = datasets.Dataset.from_dict({"text": sentences})
    before = _snapshot(quantized_llama)
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        max_length=16, packing=True, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataset_num_proc=None,
    )
    trainer = trl.SFTTrainer(model=quantized_llama, args=cfg, train_dataset=ds, processing_class=word_tokenizer)
    out = trainer.train()
    assert out.global_step == 3
    _moved_adapters_only(quantized_llama, before)
