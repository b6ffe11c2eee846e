"""The ``gptq`` serving format: OPTQ bases written as GPTQ checkpoints (GPTQModel, vLLM, TGI).

Registered with :mod:`lqmod.integrations.formats` when the plug-in is imported, so that
``lqmod.integrations.serving.export_gptq_peft`` / ``lqmod export --format gptq+peft`` find it
without the core naming this plug-in. The writer is imported on first use only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lqmod.integrations.formats import BaseFormat, ServingBase, register_base_format
from lqmod_optq.config import NAME

__all__ = ["GPTQ_FORMAT", "register"]


def _write(base: ServingBase, folder: Path, options: Mapping[str, Any]) -> None:
    from lqmod_optq.gptq_checkpoint import write_gptq_files

    write_gptq_files(base, folder, checkpoint_format=str(options.get("checkpoint_format", "gptq")))


GPTQ_FORMAT = BaseFormat(
    name="gptq",
    quantizers=(NAME,),
    write=_write,
    description="GPTQ checkpoint (qweight/qzeros/scales/g_idx + quantize_config.json): GPTQModel, vLLM, TGI",
    options=("checkpoint_format",),
)


def register() -> None:
    register_base_format(GPTQ_FORMAT)
