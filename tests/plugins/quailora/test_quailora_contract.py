"""The initializer contract for every registered initializer that ships with lqmod."""

from __future__ import annotations

from typing import Any, ClassVar

from lqmod.testing import InitializerContract


class TestQuAILoRAContract(InitializerContract):
    initializer = "quailora"
    configs: ClassVar[list[dict[str, Any]]] = [{}, {"method": "exact"}, {"method": "als", "max_iters": 3, "damp": 0.1}]
    quantizers: ClassVar[list[tuple[str, dict[str, Any]]]] = [
        ("nf", {"bits": 3}),
        ("nf", {"bits": 2, "blocksize": 32}),
        ("rtn", {"bits": 3, "group_size": 32}),
        ("optq", {"bits": 3, "group_size": 32}),
    ]


class TestDefaultInitContract(InitializerContract):
    initializer = "default"
    configs: ClassVar[list[dict[str, Any]]] = [{}, {"a_init": "gaussian"}]


class TestLQLoRAInitContract(InitializerContract):
    initializer = "lq-lora"
    configs: ClassVar[list[dict[str, Any]]] = [{"max_iters": 3}]
