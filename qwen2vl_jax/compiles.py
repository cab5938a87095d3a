"""Counting XLA compilations (the TPU user's biggest cost) through jax.monitoring.

    with CompileCounter() as compiles:
        ...
    compiles.count("prefill")   # backend compilations of jitted functions named prefill
"""
from __future__ import annotations

import collections

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Backend compilations by function name while the context is active."""

    def __init__(self):
        self.names: collections.Counter = collections.Counter()

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == _EVENT:
            name = str(kwargs.get("fun_name", "?"))
            self.names[name[4:-1] if name.startswith("jit(") else name] += 1

    def count(self, name: str | None = None) -> int:
        return sum(self.names.values()) if name is None else self.names[name]

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
