"""Keep the ``lqmod`` command's terminal for lqmod's own output.

lqmod itself imports no benchmark baseline outside :mod:`lqmod.bench` (tests/packaging checks
it). transformers, however, imports torchao and hqq by itself whenever they are installed: its
quantizer integrations probe for them when a model is loaded. In an environment that also
holds the benchmark extras (``lqmod[bench]``, the dev environment), every model load then
prints torchao's import-time messages: ``Failed to load .../torchao/_C_*.so`` for its
CUDA-only kernels on a CPU build of torch, and torch's ``_pytree`` deprecation warning for each
Enum torchao registers. Both are addressed to torchao's developers, not to someone quantizing
a model, so the command line (an application, which may configure logging) drops exactly these
records. ``import lqmod`` (a library) changes no logging: it is quiet because it imports none
of these packages.
"""

from __future__ import annotations

import logging
import os

__all__ = ["NOISE", "quiet_third_party"]

# (logger name, text the message contains): nothing else from these loggers is dropped.
NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
)


class _DropKnownNoise(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party() -> None:
    """Drop the :data:`NOISE` records and, by default, the Hub's progress bars. Idempotent.

    ``HF_HUB_DISABLE_PROGRESS_BARS`` is only defaulted (a value the user set wins) and must be
    set before huggingface_hub is imported, which reads it once. lqmod works offline, so the
    only Hub bar left is transformers' "Loading weights"; lqmod's own bars are unaffected.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, text in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) and f.text == text for f in logger.filters):
            logger.addFilter(_DropKnownNoise(text))
