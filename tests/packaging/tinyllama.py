"""Write a tiny randomly initialised Llama and its tokenizer to a directory (``save_pretrained``).

Run as a script by any Python that has transformers and tokenizers (the clean virtual
environment of test_clean_install.py, or the dev environment): it imports nothing from lqmod
or the test suite. ``python tinyllama.py OUT_DIR`` writes OUT_DIR and a ``train.txt`` in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

TEXT = [
    "the quantized model keeps its weights in few bits",
    "a model learns small adapters on top of them",
    "the base stays frozen so memory stays low",
    "memory stays low during training of the adapters",
]


def write(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *" ".join(TEXT).split()]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train.txt").write_text("\n".join(TEXT) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tinyllama.py OUT_DIR")
    print(write(Path(sys.argv[1])))
