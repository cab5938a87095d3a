"""The training input pipeline on grain: source → shuffle/repeat → ToExample (in worker processes) → Batches.

    dataset = training_batches(source, processor, model_config, data_config, seed=0)
    iterator = iter(dataset)            # grain DatasetIterator: next(iterator) → batch dict (see batching.py)
    iterator.get_state() / set_state()  # exact resume: each batch shard's position is a record index (JSON)

Resuming never repositions a live grain pipeline. A batch shard's stream is a grain MapDataset (records → slice →
shuffle → repeat → ToExample), so its position is just the index of its next record: restoring slices the MapDataset
there and only then builds the iterator (and starts its worker processes, when data.workers > 0). The stall once
blamed on grain's `set_state` was a deadlock in each fresh worker's first, multi-threaded `import
tensorflow_datasets` (bench/grain_worker_stall.py; fixed in sources.TfdsSource).
"""
from __future__ import annotations

import dataclasses

import grain

from data_pipeline.batching import BatchLayout, Batches
from data_pipeline.transforms import ToExample
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.processing import Processor


def with_pixel_bounds(processor: Processor, min_pixels: int | None, max_pixels: int | None,
                      video_total_pixels: int | None = None) -> Processor:
    """The processor with the data config's image pixel bounds and per-video pixel budget (None keeps the
    checkpoint's)."""
    import dataclasses

    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    video = {"total_pixels": video_total_pixels} if video_total_pixels else {}
    return Processor(processor.tokenizer, dataclasses.replace(processor.image_options, **bounds),
                     dataclasses.replace(processor.video_options, **video), processor.chat_template)


def check_token_ids(processor: Processor, config: Qwen2VLConfig) -> None:
    """The tokenizer's vision ids must be the model's, and its vocabulary must fit the embedding table."""
    tok = processor.tokenizer
    for name in ("image_token_id", "video_token_id"):
        if getattr(tok, name) != getattr(config, name):
            raise ValueError(f"the tokenizer's {name} {getattr(tok, name)} differs from the model config's "
                             f"{getattr(config, name)}; use the tokenizer that belongs to the checkpoint")
    if len(tok) > config.text.vocab_size:
        raise ValueError(f"the tokenizer has ids up to {len(tok) - 1} but the model's vocab_size is "
                         f"{config.text.vocab_size}")


def training_batches(source, processor: Processor, model_config: Qwen2VLConfig, data, *, seed: int, shards: int = 1,
                     shard_ids=None, hosts=None) -> grain.IterDataset:
    """Batches of `source` (a grain random-access source of records, see sources.py) for a batch cut into `shards`
    batch shards (the mesh's batch devices, sharding.rules.batch_shard_count), of which this process builds
    `shard_ids` (default: all). Shard s reads records s, s + shards, … (shuffled with `seed`), so each process reads
    and decodes only its devices' share. `hosts`: a hosts.HostAgreement when several processes build one batch."""
    check_token_ids(processor, model_config)
    processor = with_pixel_bounds(processor, data.min_pixels, data.max_pixels, data.get("video_total_pixels"))
    layout = batch_layout(model_config, data, shards)
    shard_ids = tuple(range(shards) if shard_ids is None else shard_ids)
    transform = ToExample(processor, **example_options(model_config, data, layout))
    workers = max(data.workers // len(shard_ids), 1) if data.workers else 0
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app take the defaults
            flags.FLAGS.mark_as_parsed()
    name = source_name(source)
    # grain's default read-ahead (16 threads, 500 examples) per stream would decode 500 images per shard before the
    # first batch; the streams share it instead
    read = grain.ReadOptions(num_threads=max(16 // len(shard_ids), 1),
                             prefetch_buffer_size=max(500 // len(shard_ids), 4 * layout.rows_per_shard))
    streams = []
    for s in shard_ids:
        ds = grain.MapDataset.source(source)
        if shards > 1:
            ds = ds[s::shards]
        per_pass = len(ds)
        if data.shuffle:
            ds = ds.shuffle(seed=seed)
        streams.append(ShardRecords(ds.repeat(data.num_epochs).map(transform), per_pass, read, workers,
                                    f"{name} (batch shard {s} of {shards})" if shards > 1 else name))
    return Batches(streams, layout, shard_ids, hosts)


def batch_layout(model_config: Qwen2VLConfig, data, shards: int = 1) -> BatchLayout:
    """The BatchLayout the data config asks for, over `shards` batch shards."""
    return BatchLayout(rows=data.batch_size, lengths=tuple(data.length_buckets),
                       vision_rows=tuple(data.vision_buckets), pack=data.pack, config=model_config,
                       loss_fractions=tuple(data.get("loss_fractions", BatchLayout.loss_fractions)), shards=shards)


def example_options(model_config: Qwen2VLConfig, data, layout: BatchLayout) -> dict:
    """ToExample's keyword arguments for a run: the largest length rung, the largest per-shard vision rung, the
    truncation switch and the model family's video time scale and box format."""
    return dict(max_length=max(data.length_buckets), max_vision_rows=max(layout.shard_vision_rows),
                truncate=data.truncate, model_type=model_config.model_type,
                tokens_per_second=model_config.vision.tokens_per_second if model_config.vision.windowed else None)


@dataclasses.dataclass(frozen=True)
class ShardRecords:
    """One batch shard's examples in reading order (records shuffled, repeated and mapped, lazily), opened at any
    record index."""
    examples: grain.MapDataset
    per_pass: int  # records in one pass over the shard's share of the source
    read: grain.ReadOptions
    workers: int  # worker processes (0: decode in this process)
    name: str  # the source, for messages

    def open(self, position: int) -> grain.DatasetIterator:
        """An iterator over the examples from record `position` on. Its worker processes (if any) start at its
        first `next`, already positioned: nothing is ever moved by `set_state`."""
        ds = self.examples[position:].to_iter_dataset(self.read)
        if self.workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(ds)


def source_name(source) -> str:
    """How messages name a source: a JSONL path, a tfds name and split, else its type."""
    if hasattr(source, "path"):
        return str(source.path)
    if hasattr(source, "name_or_dir"):
        return f"{source.name_or_dir}:{source.split}"
    return f"the {type(source).__name__} of training records"
