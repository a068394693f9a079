"""Where the train loop's batches come from: the grain pipeline or synthetic data.

Both give host-local numpy batches and a JSON-able state that the checkpoint stores,
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import jax
import numpy as np

from emo_jax.config import Config, ConfigError
from emo_jax.synthetic import packed_batch

if TYPE_CHECKING:
    from emo_jax.train.eval_sample import EvalSample


class BatchSource(Protocol):
    domains: tuple[str, ...]

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def synthetic_batch(config: Config, key: list[int], rows: int) -> dict:
    """Packed synthetic documents, [rows, seq_len], a pure function of (data.seed, *key)."""
    rng = np.random.default_rng([config.data.seed, *key])
    batch = packed_batch(rng, rows, config.data.seq_len, config.model.vocab_size, pad_fraction=0.0)
    batch["domain_ids"] = np.where(batch["segment_ids"] > 0, 0, -1).astype(np.int32)
    return batch


class SyntheticBatches:
    """Training batch i is a pure function of (seed, i, host): resuming only needs i."""

    domains = ("synthetic",)

    def __init__(self, config: Config):
        self.config = config
        self.index = 0

    def __next__(self) -> dict:
        rows = self.config.data.global_batch_size // jax.process_count()
        batch = synthetic_batch(self.config, [0, self.index, jax.process_index()], rows)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


class PipelineBatches:
    """The grain pipeline over a built TFDS dataset (emo_jax.data)."""

    def __init__(self, config: Config, process_index: int | None = None, process_count: int | None = None):
        """process_index/count: this process's shard of the documents (default: jax's)."""
        from emo_jax.data import pipeline
        c = config.data
        self._pipeline = pipeline
        self.iterator = pipeline.make_train_iterator(
            c.data_dir, c.dataset, seq_len=c.seq_len, global_batch_size=c.global_batch_size, seed=c.seed,
            tokenizer_path=c.tokenizer or None, num_workers=c.num_workers, shuffle_rows=c.shuffle_rows,
            process_index=process_index, process_count=process_count)
        source = pipeline.open_data_source(c.data_dir, c.dataset, "train")
        self.domains = source.domains

    def __next__(self) -> dict:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self._pipeline.iterator_state_to_json(self.iterator)

    def set_state(self, state: dict) -> None:
        self._pipeline.restore_iterator_state(self.iterator, state)


def check_vocabulary(config: Config) -> None:
    """The tokenizer's vocabulary must fit the model's embedding."""
    if config.data.dataset == "synthetic":
        return
    from emo_jax.data import pipeline
    from emo_jax.data.tokenizer import load_tokenizer
    directory = pipeline.resolve_dataset_dir(config.data.data_dir, config.data.dataset)
    tokenizer = load_tokenizer(config.data.tokenizer or directory)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{config.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}.")
    if config.routing.segments == "eos" and config.routing.eos_id != tokenizer.eos_id:
        raise ConfigError(f"routing.segments=eos splits router documents at routing.eos_id={config.routing.eos_id}, "
                          f"but the tokenizer's EOS is {tokenizer.eos_id}; set routing.eos_id={tokenizer.eos_id}.")


def train_batches(config: Config) -> BatchSource:
    if config.data.dataset == "synthetic":
        return SyntheticBatches(config)
    check_vocabulary(config)
    return PipelineBatches(config)


def eval_sample(config: Config) -> "EvalSample":
    """The run's fixed validation sample (train/eval_sample.py); for synthetic data,
    train.eval_batches global batches of the validation stream and no routing rows."""
    from emo_jax.train.eval_sample import EvalSample, build_eval_sample
    if config.data.dataset != "synthetic":
        return build_eval_sample(config)
    batches = tuple(synthetic_batch(config, [1_000_003, i], config.data.global_batch_size)
                    for i in range(config.train.eval_batches))  # global batches; host_rows slices them
    return EvalSample(domains=SyntheticBatches.domains, loss_batches=batches, routing_batches=(),
                      routing_domains=np.zeros((0,), np.int32))
