"""One LoRA finetune step on an lqmod checkpoint of a causal LM, through lqmod's public Python API.

Run as a script by the clean virtual environment of test_clean_install.py:
``python one_step.py CHECKPOINT MODEL_DIR OUT`` (MODEL_DIR holds the tokenizer and train.txt).
It checks what one step must do and exits non-zero otherwise: gradients reach every adapter
through the quantized base (B starts at zero, so a B that moved got a gradient), the frozen
weights do not move, and the loss on the batch goes down.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lqmod.io import load_checkpoint, save_checkpoint
from lqmod.model import iter_lora_layers, lora_parameters


def main(ckpt: str, base: str, out: str) -> None:
    model = load_checkpoint(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = Path(base, "train.txt").read_text(encoding="utf-8").splitlines()
    batch = tokenizer(text, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    layers = dict(iter_lora_layers(model))
    assert layers and all(torch.count_nonzero(m.lora_B) == 0 for m in layers.values()), "B must start at zero"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "the quantized model has no frozen parameters"

    opt = torch.optim.SGD(lora_parameters(model), lr=0.05)  # plain SGD: nothing moves without a gradient
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = model(**batch, labels=labels).loss

    assert math.isfinite(loss.item()), f"loss {loss.item()}"
    moved = [n for n, m in layers.items() if torch.count_nonzero(m.lora_B) > 0]
    assert len(moved) == len(layers), f"only {len(moved)} of {len(layers)} adapters got a gradient"
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen), "a frozen weight moved"
    assert after.item() < loss.item(), f"loss did not go down: {loss.item():.5f} -> {after.item():.5f}"
    save_checkpoint(model, out)
    print(f"one step: loss {loss.item():.4f} -> {after.item():.4f}; {len(layers)} adapters updated; wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python one_step.py CHECKPOINT MODEL_DIR OUT")
    main(*sys.argv[1:])
