"""Must-show on real weights: quip's layer output error on held-out WikiText-2 activations of
all-MiniLM-L6-v2 is below NF, RTN and HQQ at equal or more bits per parameter.

The full 36-matrix table is in plugins/lqmod_quip/README.md (``python
tests/plugins/quip/quip_minilm_layers.py``); this test runs the last block (6 matrices,
the hardest ones) at 2 and 3 bits to stay within about a CPU minute in the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from quip_minilm_layers import Row, measure, table


@pytest.mark.slow
def test_quip_beats_nf_rtn_hqq_on_minilm(minilm_dir: str) -> None:
    pytest.importorskip("hqq", reason="the HQQ baseline needs the hqq package")
    from lqmod.data import DataNotFoundError

    torch.set_num_threads(1)
    try:
        rows = measure((5,), (2, 3))
    except DataNotFoundError as exc:
        pytest.skip(f"WikiText-2 data unavailable: {exc}")
    print("\n" + table(rows))

    def pick(method: str) -> dict[str, Row]:
        return {r.layer: r for r in rows if r.method == method}

    for bits, rivals in ((2, ("nf2-b64-dq", "rtn2-g64", "hqq2-g64")), (3, ("nf3-b64-dq",))):
        ours = pick(f"quip{bits}")
        assert len(ours) == 6
        for rival in rivals:
            theirs = pick(rival)
            for layer, r in ours.items():
                assert theirs[layer].bits_per_param >= r.bits_per_param, f"{rival} uses fewer bits on {layer}"
                if bits == 2:  # at 2 bits the margin is large (0.16 vs >= 0.33): hold every layer to it
                    assert r.error < theirs[layer].error, (
                        f"{layer}: quip2 {r.error:.4f} >= {rival} {theirs[layer].error:.4f}"
                    )
            mean_ours = sum(r.error for r in ours.values()) / len(ours)
            mean_theirs = sum(r.error for r in theirs.values()) / len(theirs)
            assert mean_ours < mean_theirs, f"mean error quip{bits} {mean_ours:.4f} >= {rival} {mean_theirs:.4f}"
