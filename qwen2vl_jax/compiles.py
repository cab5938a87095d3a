"""Counting XLA compilations (the TPU user's biggest cost) through jax.monitoring, and JAX's persistent compilation
cache (programs compiled by an earlier process are loaded from disk instead of compiled again).

    with CompileCounter() as compiles:
        ...
    compiles.count("prefill")      # programs built for jitted functions named prefill (compiled or loaded)
    compiles.compiled("prefill")   # ... of which XLA compiled
    compiles.loaded("prefill")     # ... of which came from the persistent cache

    with CompileCache("~/.cache/qwen2vl-jax/compile_cache") as cache:   # "" or None: leave JAX's setting alone
        ...
    cache.programs.loaded(), cache.programs.compiled()
"""
from __future__ import annotations

import collections
import os
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"  # around every build, a cache hit included
_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # inside that build, when the executable came from the cache


class CompileCounter:
    """Programs built by function name while the context is active, and which of them the persistent cache served.

    A hit is recorded (on the compiling thread) just before the build's duration event, which names the function:
    the hit belongs to the next build that thread finishes."""

    def __init__(self):
        self.names: collections.Counter = collections.Counter()
        self.hits: collections.Counter = collections.Counter()
        self._pending = threading.local()

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == _EVENT:
            name = str(kwargs.get("fun_name", "?"))
            name = name[4:-1] if name.startswith("jit(") else name
            self.names[name] += 1
            if getattr(self._pending, "hit", False):
                self._pending.hit = False
                self.hits[name] += 1

    def _listen_event(self, event: str, **kwargs) -> None:
        if event == _CACHE_HIT:
            self._pending.hit = True

    def count(self, name: str | None = None) -> int:
        """Programs built (compiled or loaded from the persistent cache)."""
        return sum(self.names.values()) if name is None else self.names[name]

    def loaded(self, name: str | None = None) -> int:
        """Programs loaded from the persistent compilation cache."""
        return sum(self.hits.values()) if name is None else self.hits[name]

    def compiled(self, name: str | None = None) -> int:
        """Programs XLA compiled."""
        return self.count(name) - self.loaded(name)

    def start(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        jax.monitoring.register_event_listener(self._listen_event)
        return self

    def stop(self) -> "CompileCounter":
        jax.monitoring.unregister_event_duration_listener(self._listen)
        jax.monitoring.unregister_event_listener(self._listen_event)
        return self

    def __enter__(self) -> "CompileCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def user_cache_dir() -> str:
    """The default cache of the one-shot commands (qwen2vl-generate, qwen2vl-eval): JAX_COMPILATION_CACHE_DIR when
    set, else $XDG_CACHE_HOME/qwen2vl-jax/compile_cache (~/.cache/...): private to the user, since JAX runs what the
    cache holds."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qwen2vl-jax", "compile_cache")


def add_cache_flag(parser) -> None:
    """`--compile-cache DIR` for a one-shot command's argparse parser (read back with `cache_from_flag`)."""
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="JAX's persistent compilation cache: a later call loads these programs instead of "
                             "compiling them (default: $JAX_COMPILATION_CACHE_DIR or ~/.cache/qwen2vl-jax/"
                             "compile_cache; \"\" = off)")


def cache_from_flag(value: str | None) -> "CompileCache":
    """The CompileCache a `--compile-cache` value asks for (None: `user_cache_dir()`)."""
    return CompileCache(user_cache_dir() if value is None else value)


class CompileCache:
    """JAX's persistent compilation cache in `directory` (local or gs://) while open, for every program however
    small or quick to compile (so CPU runs gain too; JAX's defaults skip programs under 1 s), with a CompileCounter
    (`.programs`) over the same span. Closing restores the previous settings. Only process 0 writes entries (JAX's
    rule); every process reads (on CPU only process 0 hits: JAX keys CPU programs by a per-process topology).
    Entries are keyed by the program, devices, flags and JAX version, so a changed model or mesh simply misses.
    `directory` "" / None: nothing changes (JAX's own settings, e.g. the JAX_COMPILATION_CACHE_DIR variable, still
    apply)."""

    _SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")

    def __init__(self, directory: str | None):
        self.directory = os.path.expanduser(os.fspath(directory)) if directory else None
        self.programs = CompileCounter()
        self._previous: dict | None = None

    def open(self) -> "CompileCache":
        if self.directory:
            self._previous = {name: getattr(jax.config, name) for name in self._SETTINGS}
            self._set(self.directory, 0.0, -1)  # -1: no size floor, and JAX may not raise it
        self.programs.start()
        return self

    def close(self) -> "CompileCache":
        self.programs.stop()
        if self._previous is not None:
            self._set(*(self._previous[name] for name in self._SETTINGS))
            self._previous = None
        return self

    def _set(self, directory, min_seconds, min_bytes) -> None:
        if jax.config.jax_compilation_cache_dir != directory:
            from jax.experimental.compilation_cache import compilation_cache
            compilation_cache.reset_cache()  # JAX opens its cache once, at the first compile, with the path of then
            jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", min_bytes)

    def summary(self) -> dict:
        """{"dir", "loaded", "compiled"}: programs this span loaded from the cache and compiled."""
        return {"dir": self.directory, "loaded": self.programs.loaded(), "compiled": self.programs.compiled()}

    def __enter__(self) -> "CompileCache":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
