"""Shape ladders: any mix of batch sizes, prompt lengths and image sizes becomes one of a few static shapes.

Each ladder is a sorted tuple of rungs; a request set takes the smallest rung that holds it. The vision encoder is
compiled per `vision_rows` rung, the prefill per (batch, length, cache) rung and the decode step per (batch, cache)
rung, so compile counts add across ladders instead of multiplying. The cache rung follows from the length rung and
max_new_tokens, and the cache ladder is coarser than the length ladder, so few decode programs serve many prefills.

Default length and vision-row rungs grow ×2, so at most half of either padded axis is waste (×4 rungs wasted up to
75 %: a 290-token prompt ran as 1024, and batch-8 prefill cost 1.44× transformers'). Batch: 1, 4, then ×2 (a batch
of 8 runs as 8). The cache ladder stays ×4 from 2048: it sets decode's memory, not prefill's work. An extra rung
costs one compile per machine with the persistent compilation cache (`compiles.py`); `tests/test_generate.py`
counts the programs 50 random requests (28–1500 px images, aspect up to 1:8) compile."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Ladders:
    batch: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    length: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    cache: tuple[int, ...] = (2048, 8192, 32768)
    vision_rows: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static shapes one generate call runs with."""
    batch: int
    length: int
    cache: int
    vision_rows: int  # 0: no vision input


def rung(ladder: tuple[int, ...], need: int, what: str) -> int:
    """The smallest rung ≥ need; ValueError naming `what` when none is large enough."""
    for size in ladder:
        if size >= need:
            return size
    raise ValueError(f"{what} {need} exceeds the largest bucket {ladder[-1]}; shorten the request (fewer or smaller "
                     f"images, a shorter prompt or fewer new tokens) or pass larger Ladders")


def batch_rung(ladders: Ladders, batch: int, multiple: int = 1) -> int:
    """The batch rung for `batch` prompts: the smallest rung ≥ batch that `multiple` (the mesh's batch shards)
    divides; ValueError when the ladder has none."""
    rungs = tuple(size for size in ladders.batch if size % multiple == 0)
    if not rungs:
        raise ValueError(f"no batch bucket of {ladders.batch} is a multiple of the mesh's {multiple} batch shards; "
                         f"pass Ladders(batch=...) with multiples of {multiple}, or a mesh with fewer batch shards")
    return rung(rungs, batch, "batch size")


def shapes_for(ladders: Ladders, batch: int, length: int, vision_rows: int, max_new_tokens: int,
               batch_multiple: int = 1) -> Shapes:
    """Bucketed shapes for `batch` prompts of at most `length` tokens holding `vision_rows` patch rows (in all, or
    in the largest batch shard's packed ViT sequence); the batch rung is a multiple of `batch_multiple`."""
    padded_length = rung(ladders.length, length, "prompt length (tokens, image placeholders included)")
    return Shapes(batch=batch_rung(ladders, batch, batch_multiple), length=padded_length,
                  cache=rung(ladders.cache, padded_length + max_new_tokens,
                             f"prompt bucket {padded_length} + max_new_tokens"),
                  vision_rows=rung(ladders.vision_rows, vision_rows, "vision patch rows") if vision_rows else 0)


@dataclasses.dataclass
class PaddingStats:
    """Real vs padded elements per axis, accumulated over calls; `waste()` → fraction of padding per axis."""
    real: dict = dataclasses.field(default_factory=lambda: {"tokens": 0, "vision_rows": 0, "cache": 0})
    padded: dict = dataclasses.field(default_factory=lambda: {"tokens": 0, "vision_rows": 0, "cache": 0})

    def add(self, shapes: Shapes, tokens: int, vision_rows: int, cache_used: int) -> None:
        for key, real, padded in (("tokens", tokens, shapes.batch * shapes.length),
                                  ("vision_rows", vision_rows, shapes.vision_rows),
                                  ("cache", cache_used, shapes.batch * shapes.cache)):
            self.real[key] += real
            self.padded[key] += padded

    def waste(self) -> dict[str, float]:
        return {k: 1 - self.real[k] / self.padded[k] if self.padded[k] else 0.0 for k in self.real}
