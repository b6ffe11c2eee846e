"""Perplexity against a hand computation, one token at a time, and ``lqmod eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from lqmod.evaluation import stream_perplexity, window_plan, windows_loss

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("transformers")


@torch.no_grad()
def _by_hand(model: torch.nn.Module, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Each token t >= 1 scored once, from the start of the first window that holds it with
    something before it: windows start every ``stride`` tokens and hold ``context`` tokens."""
    nll, n = 0.0, 0
    for t in range(1, ids.numel()):
        begin = 0
        while not (begin < t < begin + context):
            begin += stride
        logits = model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1].double()
        nll -= float(torch.log_softmax(logits, -1)[ids[t]])
        n += 1
    return nll / n, n


@pytest.mark.parametrize(("context", "stride"), [(8, 8), (8, 3), (12, 5)])
def test_sliding_window_perplexity_matches_a_hand_computation(
    tiny_llama: torch.nn.Module, context: int, stride: int
) -> None:
    ids = torch.randint(0, 101, (37,), generator=torch.Generator().manual_seed(1))
    res = stream_perplexity(tiny_llama, ids, context=context, stride=stride, batch_size=3)
    if stride == context:
        # Disjoint windows: the first token of each window has no context and is not scored.
        starts = set(range(0, 37, context))
        want_nll, want_n = _disjoint(tiny_llama, ids, context)
        assert res.tokens == 36 - (len(starts) - 1)
    else:
        want_nll, want_n = _by_hand(tiny_llama, ids, context, stride)
        assert res.tokens == 36
    assert res.tokens == want_n
    assert res.nll == pytest.approx(want_nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(want_nll), rel=1e-5)


@torch.no_grad()
def _disjoint(model: torch.nn.Module, ids: torch.Tensor, context: int) -> tuple[float, int]:
    nll, n = 0.0, 0
    for begin in range(0, ids.numel(), context):
        for t in range(begin + 1, min(begin + context, ids.numel())):
            logits = model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1].double()
            nll -= float(torch.log_softmax(logits, -1)[ids[t]])
            n += 1
    return nll / n, n


def test_window_plan_scores_every_token_once() -> None:
    for n, ctx, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 1), (5, 16, 16)]:
        scored = [t for _, end, first in window_plan(n, ctx, stride) for t in range(first, end)]
        assert len(scored) == len(set(scored))
        if stride < ctx:
            assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride must be between 1 and the context"):
        window_plan(10, 4, 5)


def test_windows_loss_ignores_masked_labels(tiny_llama: torch.nn.Module) -> None:
    ids = torch.randint(0, 101, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :6] = -100
    res = windows_loss(tiny_llama, ids, labels, batch_size=2)
    assert res.tokens == 3 * 4
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids).logits[:, 5:-1].double()
        want = -torch.log_softmax(logits, -1).gather(-1, ids[:, 6:, None]).mean()
    assert res.nll == pytest.approx(float(want), rel=1e-5)


@pytest.fixture
def model_dir(tiny_llama: LlamaForCausalLM, word_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> Path:
    path = tmp_path / "tiny"
    tiny_llama.save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return path


def test_lqmod_eval_on_model_and_checkpoint(model_dir: Path, train_text: str, tmp_path: Path) -> None:
    from lqmod.cli import main

    text = tmp_path / "held-out.txt"
    text.write_text(train_text)
    out = tmp_path / "fp.json"
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--context", "16", "--stride", "8",
                 "--max-tokens", "64", "--json", str(out), "--no-progress"]) == 0
    fp = json.loads(out.read_text())
    assert fp["tokens"] == 63 and fp["stride"] == 8 and fp["ppl"] > 1
    assert main(["quantize", str(model_dir), "--config", "bits=4,blocksize=32", "--rank", "4",
                 "--out", str(tmp_path / "q")]) == 0
    for extra, name in [([], "q.json"), (["--no-adapters"], "base.json")]:
        assert main(["eval", "--checkpoint", str(tmp_path / "q"), *extra, "--text", str(text), "--context", "16",
                     "--max-tokens", "64", "--json", str(tmp_path / name), "--no-progress"]) == 0
    q, base = (json.loads((tmp_path / n).read_text()) for n in ("q.json", "base.json"))
    # B = 0 at initialisation: the adapters change nothing yet; NF4 moves the fp perplexity a little.
    assert q["ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    assert q["ppl"] != fp["ppl"] and abs(math.log(q["ppl"] / fp["ppl"])) < 0.5


def test_lqmod_eval_errors(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lqmod.cli import main

    assert main(["eval", "--model", str(model_dir), "--text", "nowhere.txt", "--no-progress"]) == 2
    assert "neither a corpus" in capsys.readouterr().out
    assert main(["eval", "--model", str(model_dir), "--no-adapters", "--no-progress"]) == 2
    assert "--no-adapters applies to --checkpoint only" in capsys.readouterr().out
