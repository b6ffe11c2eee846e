"""The causal-LM loop: schedule, accumulation, resume, gradient checkpointing, autocast."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from lqmod.train import FinetuneConfig, PackedData, Record, StepInfo, pack_records, step_windows, train_causal_lm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

pytest.importorskip("transformers")


@pytest.fixture
def data(word_tokenizer: PreTrainedTokenizerFast, train_text: str) -> PackedData:
    return pack_records(word_tokenizer, [Record(train_text)], 16)


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {n: t.clone() for n, t in state.items() if "lora_" not in n}


def test_warmup_then_cosine_schedule(quantized_llama: torch.nn.Module, data: PackedData) -> None:
    cfg = FinetuneConfig(steps=10, warmup_steps=3, lr=1e-2, micro_batch_size=2, seq_len=16)
    lrs: list[float] = []
    train_causal_lm(quantized_llama, data, cfg, progress=False, callbacks=[lambda s: lrs.append(s.lr)])
    want = [1e-2 * s / 3 for s in range(3)] + [1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 10)]
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_linear_schedule_decays_to_zero(quantized_llama: torch.nn.Module, data: PackedData) -> None:
    cfg = FinetuneConfig(steps=4, warmup_steps=0, lr=1e-2, schedule="linear", micro_batch_size=2, seq_len=16)
    lrs: list[float] = []
    train_causal_lm(quantized_llama, data, cfg, progress=False, callbacks=[lambda s: lrs.append(s.lr)])
    assert lrs == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_batches_are_a_function_of_seed_and_step(data: PackedData) -> None:
    cfg = FinetuneConfig(steps=8, micro_batch_size=3, grad_accum=2, seq_len=16, seed=5)
    first = [torch.cat(step_windows(s, len(data), cfg)) for s in range(8)]
    again = [torch.cat(step_windows(s, len(data), cfg)) for s in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    seen = torch.cat(first[:3])  # 18 windows = one epoch: each exactly once
    assert sorted(seen.tolist()) == list(range(len(data)))


@pytest.mark.slow
@pytest.mark.parametrize(("micro", "accum"), [(2, 2), (1, 4)])
def test_accumulation_equals_one_larger_batch(
    tiny_llama: torch.nn.Module, data: PackedData, micro: int, accum: int
) -> None:
    import copy

    from lqmod.model import quantize_model

    quantize_model(tiny_llama, "nf", {"bits": 4, "blocksize": 32}, lora={"r": 4, "alpha": 8}, progress=False)
    twin = copy.deepcopy(tiny_llama)
    masked = PackedData(data.input_ids, data.labels.clone(), "masked")
    masked.labels[::3, :7] = -100  # unequal scored tokens per window: means of means would differ
    one = FinetuneConfig(steps=3, micro_batch_size=4, grad_accum=1, seq_len=16, lr=1e-2, warmup_steps=0)
    many = one.model_copy(update={"micro_batch_size": micro, "grad_accum": accum})
    r1 = train_causal_lm(tiny_llama, masked, one, progress=False)
    r2 = train_causal_lm(twin, masked, many, progress=False)
    assert r1.losses == pytest.approx(r2.losses, rel=1e-5)
    for (name, a), b in zip(_adapters(tiny_llama).items(), _adapters(twin).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_only_adapters_move(quantized_llama: torch.nn.Module, data: PackedData) -> None:
    before, frozen = _adapters(quantized_llama), _frozen(quantized_llama)
    train_causal_lm(quantized_llama, data, FinetuneConfig(steps=2, micro_batch_size=2, seq_len=16), progress=False)
    after = _adapters(quantized_llama)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    for n, t in _frozen(quantized_llama).items():
        assert torch.equal(t, frozen[n]), n


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_reaches_the_same_adapters(
    tiny_llama: torch.nn.Module, word_tokenizer: PreTrainedTokenizerFast, data: PackedData, tmp_path: Path
) -> None:
    import copy

    from lqmod.model import quantize_model

    # Dropout on: the resumed run must also restore the RNG to match.
    quantize_model(
        tiny_llama, "nf", {"bits": 4, "blocksize": 32}, lora={"r": 4, "alpha": 8, "dropout": 0.2}, progress=False
    )
    start = copy.deepcopy(tiny_llama)
    cfg = FinetuneConfig(steps=6, micro_batch_size=2, grad_accum=2, seq_len=16, lr=5e-3, save_every=2, eval_every=3)
    held = data.take(2)
    full = train_causal_lm(copy.deepcopy(start), data, cfg, eval_data=held, run_dir=tmp_path / "a", progress=False)

    def stop_at_4(info: StepInfo) -> None:
        if info.step == 4:
            raise _Interrupt

    victim = copy.deepcopy(start)
    with pytest.raises(_Interrupt):
        train_causal_lm(
            victim, data, cfg, eval_data=held, run_dir=tmp_path / "b", progress=False, callbacks=[stop_at_4]
        )
    # A fresh process: the starting checkpoint again, then --resume.
    resumed_model = copy.deepcopy(start)
    resumed = train_causal_lm(
        resumed_model, data, cfg, eval_data=held, run_dir=tmp_path / "b", resume=True, progress=False
    )
    assert resumed.resumed_from == 4
    uninterrupted = copy.deepcopy(start)
    train_causal_lm(uninterrupted, data, cfg, run_dir=tmp_path / "c", progress=False)
    for (name, a), b in zip(_adapters(uninterrupted).items(), _adapters(resumed_model).values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.losses == full.losses
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))  # no step logged twice
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3, 6]
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 1000
    states = sorted(p.name for p in (tmp_path / "b" / "states").iterdir())
    assert states == ["step-000004", "step-000006"]  # keep_states=2


def test_resume_with_other_settings_is_refused(
    quantized_llama: torch.nn.Module, data: PackedData, tmp_path: Path
) -> None:
    cfg = FinetuneConfig(steps=2, micro_batch_size=2, seq_len=16)
    train_causal_lm(quantized_llama, data, cfg, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another config, training data"):
        train_causal_lm(
            quantized_llama, data, cfg.model_copy(update={"lr": 0.5}), run_dir=tmp_path, resume=True, progress=False
        )


def _lora_grads(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    from lqmod.evaluation import token_nll

    model.zero_grad(set_to_none=True)
    model.train()
    nll, n = token_nll(model, batch, batch)
    (nll / n).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(quantized_llama: torch.nn.Module, data: PackedData) -> None:
    from lqmod.model import iter_lora_layers

    for m in quantized_llama.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    calls = [0]
    for _, layer in iter_lora_layers(quantized_llama):
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    batch = data.input_ids[:4]
    plain = _lora_grads(quantized_llama, batch)
    plain_calls, calls[0] = calls[0], 0
    from lqmod.train.loop import _gradient_checkpointing

    _gradient_checkpointing(quantized_llama, True)
    ckpt = _lora_grads(quantized_llama, batch)
    # Each quantized layer ran again in backward: the blocks really were recomputed.
    assert plain_calls == 14 and calls[0] == 2 * 14
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 14  # A and B of 14 layers
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_on_cpu_trains(quantized_llama: torch.nn.Module, data: PackedData) -> None:
    cfg = FinetuneConfig(steps=3, micro_batch_size=2, seq_len=16, precision="bf16", lr=1e-2)
    res = train_causal_lm(quantized_llama, data, cfg, eval_data=data.take(2), progress=False)
    ref = FinetuneConfig(steps=3, micro_batch_size=2, seq_len=16, precision="fp32", lr=1e-2)
    assert all(math.isfinite(x) for x in res.losses)
    assert res.evals[0]["eval_loss"] == pytest.approx(
        train_causal_lm(
            quantized_llama, data, ref.model_copy(update={"steps": 1}), eval_data=data.take(2), progress=False
        ).evals[0]["eval_loss"],
        rel=0.05,
    )
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        train_causal_lm(quantized_llama, data, cfg.model_copy(update={"precision": "fp16"}), progress=False)


def test_bad_settings_are_refused(quantized_llama: torch.nn.Module, data: PackedData) -> None:
    with pytest.raises(ValueError, match="training windows have 16 tokens, the config says seq_len=32"):
        train_causal_lm(quantized_llama, data, FinetuneConfig(seq_len=32), progress=False)
    with pytest.raises(ValueError, match="warmup_steps=9 is more than steps=4"):
        FinetuneConfig(steps=4, warmup_steps=9)
    with pytest.raises(ValueError, match="finite"):
        FinetuneConfig(lr=float("inf"))


def test_resume_into_renamed_parameters_names_the_first_difference(tmp_path: Path) -> None:
    from lqmod.train.state import TrainState, load_state, save_state

    saved = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = torch.optim.AdamW(saved.parameters())
    path = save_state(tmp_path, saved, opt, TrainState(step=1, fingerprint="f", scheduler={}))
    # Same number of tensors, other names: a module renamed between the save and the resume.
    renamed = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2))
    want = r"2 named tensors, #0 '0\.weight'\) than this model has \(2, #0 '1\.weight'\)"
    with pytest.raises(ValueError, match=want):
        load_state(path, renamed, torch.optim.AdamW(renamed.parameters()))
