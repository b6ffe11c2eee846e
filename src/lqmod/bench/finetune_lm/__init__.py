"""The quantizer x initializer finetuning benchmark on a causal LM (SmolLM2-135M by default).

Every row is one way to get a LoRA-trainable model out of the same fp model: a quantizer
(NF 4/3/2, sequential OPTQ 3/2, QuIP#-like 3/2, an ILP plan over several quantizers at an
average-bits budget) with the ``default`` LoRA initializer (``B = 0``: the step-0 model *is*
the quantized model) or with ``lq-lora`` (the adapter starts at the low-rank part of an LQ
decomposition made with that layer's own quantizer), plus two baselines: bitsandbytes + PEFT
QLoRA NF4 and PEFT LoRA on the dense fp32 model. Each row then trains its adapters for the
same steps on the same packed windows (same seed, rank, alpha, learning rate) with
:func:`lqmod.train.train_causal_lm`, and is scored before and after by
:func:`lqmod.evaluation.stream_perplexity` on the same held-out token stream.

Resumable row by row: each finished row is written at once (atomically) to
``<out>/rows/<row>.json`` with a fingerprint of the row and of every setting that changes its
numbers; a rerun skips rows whose file has the current fingerprint. Under the cache folder
live what is expensive to recompute: calibration statistics (:class:`lqmod.calibration.StatsCache`),
error tables of the plans (:class:`lqmod.allocation.TableCache`), the plans, the quantized
models with their initial adapters (:func:`lqmod.io.save_checkpoint`), and the training runs'
resumable states (a row interrupted mid-training resumes from its newest state).

The package's modules: :mod:`.settings` (what changes a row's numbers), :mod:`.rows` (the rows and
:data:`DEFAULT_ROWS`), :mod:`.fingerprints` (what results and caches are keyed by), :mod:`.store`
(files), :mod:`.context` (the shared model and data), :mod:`.build` (one row's trainable model),
:mod:`.compute` (one row), :mod:`.run` (the run and its summary), :mod:`.report` and :mod:`.plots`.
"""

from __future__ import annotations

# ``replace`` stays reachable here: callers derive settings with ``finetune_lm.replace(FULL, ...)``.
from dataclasses import replace as replace

from lqmod.bench.finetune_lm.build import storage_bits as storage_bits
from lqmod.bench.finetune_lm.compute import compute_row as compute_row
from lqmod.bench.finetune_lm.fingerprints import RESULTS_VERSION as RESULTS_VERSION
from lqmod.bench.finetune_lm.fingerprints import row_fingerprint as row_fingerprint
from lqmod.bench.finetune_lm.plots import plot_loss_curves as plot_loss_curves
from lqmod.bench.finetune_lm.plots import plot_ppl_vs_bits as plot_ppl_vs_bits
from lqmod.bench.finetune_lm.report import COLUMNS as COLUMNS
from lqmod.bench.finetune_lm.report import markdown as markdown
from lqmod.bench.finetune_lm.report import table_cells as table_cells
from lqmod.bench.finetune_lm.report import write_outputs
from lqmod.bench.finetune_lm.rows import DEFAULT_ROWS, ROWS, LMRow, select_rows
from lqmod.bench.finetune_lm.rows import NF as NF
from lqmod.bench.finetune_lm.rows import Calibration as Calibration
from lqmod.bench.finetune_lm.rows import RowKind as RowKind
from lqmod.bench.finetune_lm.run import BenchRun, aggregate, run_benchmark
from lqmod.bench.finetune_lm.settings import FULL, QUICK, LMBenchSettings
from lqmod.bench.finetune_lm.store import default_cache_dir

__all__ = [
    "DEFAULT_ROWS",
    "FULL",
    "QUICK",
    "ROWS",
    "BenchRun",
    "LMBenchSettings",
    "LMRow",
    "aggregate",
    "default_cache_dir",
    "run_benchmark",
    "select_rows",
    "write_outputs",
]
