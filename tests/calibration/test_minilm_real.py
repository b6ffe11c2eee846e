"""Real all-MiniLM-L6-v2 on real WikiText sentences (slow: loads the model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lqmod.calibration import collect_hessians, diagonal_fisher, text_batches
from lqmod.cli import main

pytestmark = pytest.mark.slow

NAMES = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.key",
    "encoder.layer.5.output.dense",
    "pooler.dense",
]


def _sentences(n: int) -> list[str]:
    from lqmod.calibration.text import calibration_paragraphs, sentences
    from lqmod.data import DataNotFoundError

    try:
        return sentences(calibration_paragraphs("wikitext2"))[:n]
    except DataNotFoundError as exc:
        pytest.skip(f"WikiText-2 data unavailable: {exc}")


def test_minilm_hessians_and_fisher(minilm_dir: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batches = text_batches(tokenizer, _sentences(8), batch_size=4)
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)  # padding present
    stats = collect_hessians(model, NAMES, batches, progress=False)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    for name in NAMES:
        h = stats[name].hessian
        assert h is not None and h.dtype == torch.float64
        assert stats[name].n_tokens == (8 if name == "pooler.dense" else n_real)
        torch.testing.assert_close(h, h.T, rtol=0, atol=0)
        eig = torch.linalg.eigvalsh(h)
        # PSD up to float32 rounding of the per-batch products (rank-deficient: fewer tokens than features).
        assert float(eig.min()) >= -1e-6 * float(eig.max())
        absmean = stats[name].act_absmean
        assert absmean is not None and bool((absmean > 0).any())
    fisher = diagonal_fisher(model, NAMES[:3], batches, progress=False)
    for name in NAMES[:3]:
        f = fisher[name]
        assert f.shape == model.get_submodule(name).weight.shape
        assert bool(torch.isfinite(f).all()) and float(f.min()) >= 0 and float(f.max()) > 0
    assert all(p.grad is None for p in model.parameters())


def test_calibrate_and_sequential_quantize_cli(minilm_dir: str, tmp_path: Path) -> None:
    _sentences(1)
    cache = tmp_path / "cache"
    args = ["calibrate", "--model", minilm_dir, "--n", "8", "--kind", "hessian", "--cache", str(cache),
            "--include", r"layer\.0\.", "--no-progress"]
    assert main(args) == 0
    (entry,) = cache.iterdir()
    assert (entry / "manifest.json").is_file() and (entry / "stats.safetensors").is_file()
    assert main(args) == 0  # reused
    assert len(list(cache.iterdir())) == 1
    out = tmp_path / "ckpt"
    assert main(["quantize", minilm_dir, "--quantizer", "nf", "--include", r"layer\.0\.", "--calib-text",
                 "wikitext2", "--n-calib", "8", "--sequential", "--out", str(out)]) == 0
    assert out.exists()
