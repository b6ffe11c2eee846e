"""Kernel tests: skip rules and a summary table of the kernels' errors.

The Triton kernels run on CPU through triton's interpreter. Nothing here sets
``TRITON_INTERPRET`` for the session: :func:`lqmod.kernels.triton.import_kernels` switches
it on just while the kernel modules are decorated, so other tests' triton users (e.g.
bitsandbytes) keep their normal mode.
"""

from __future__ import annotations

import pytest
import torch
from lut_cases import ERRORS

from lqmod.kernels.triton import triton_available

HAS_TRITON = triton_available()
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("triton") and not HAS_TRITON:
            item.add_marker(pytest.mark.skip(reason="triton is not installed (pip install lqmod[triton])"))
        if item.get_closest_marker("gpu") and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ERRORS:
        return
    terminalreporter.section("kernel error vs float64 (max abs): kernel <= 2 x torch + atol")
    terminalreporter.write_line(f"{'case':<34} {'quantity':<10} {'kernel':>10} {'torch':>10} {'bound':>10}")
    for case, what, err, base, bound in ERRORS:
        terminalreporter.write_line(f"{case:<34} {what:<10} {err:>10.3g} {base:>10.3g} {bound:>10.3g}")
