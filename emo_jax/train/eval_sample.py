"""The periodic validation sample: fixed, and balanced over the dataset's domains.

Built once per run from the validation split and the same at every evaluation, so
the numbers of two evaluations (or two runs) are comparable:
- loss rows: every domain's validation documents (record order) packed with the
  training packer's rules into `rows_per_domain` rows, where rows_per_domain =
  train.eval_batches x data.global_batch_size // domains. Every domain gets the same
  number of rows (fewer only if its validation split is shorter), so no domain is
  missing from the per-domain losses and none dominates the mean;
- routing rows: the first train.eval_routing_docs validation documents of every
  domain, one per row (its first seq_len tokens), for the specialisation measures
  (emo_jax/specialisation.py).
Batches are global ([global_batch_size, S], padding rows at the end); `host_rows`
takes this process's slice, in the order the batch sharding expects.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from emo_jax.config import Config
from emo_jax.data import packing

Batch = dict[str, np.ndarray]  # packing.ROW_KEYS -> [global_batch_size, S]
CHARS_PER_TOKEN_BOUND = 8  # read this many characters per wanted token (BPE averages 3-4)


@dataclasses.dataclass(frozen=True)
class EvalSample:
    domains: tuple[str, ...]
    loss_batches: tuple[Batch, ...]
    routing_batches: tuple[Batch, ...]  # one document per row; empty when off
    routing_domains: np.ndarray  # i32[routing documents]: domain index of each real routing row

    @property
    def rows_per_domain(self) -> dict[str, int]:
        rows = np.concatenate([b["domain_ids"][:, 0] for b in self.loss_batches])
        return {d: int(np.sum(rows == i)) for i, d in enumerate(self.domains)}


def _batches(rows: list[dict[str, np.ndarray]], batch_size: int, pad_id: int) -> tuple[Batch, ...]:
    return tuple(packing.pad_batch(packing.stack_rows(rows[s:s + batch_size]), batch_size, pad_id)
                 for s in range(0, len(rows), batch_size))


def build_eval_sample(config: Config) -> EvalSample:
    """The sample of `config`'s dataset (see the module docstring)."""
    from emo_jax.modular.documents import (dataset_domains, documents_by_domain, one_document_per_row,
                                           tokenizer_for)
    d, t = config.data, config.train
    tokenizer = tokenizer_for(config)
    rows_per_domain = max(1, t.eval_batches * d.global_batch_size // len(dataset_domains(d.data_dir, d.dataset)))
    wanted_chars = rows_per_domain * d.seq_len * CHARS_PER_TOKEN_BOUND

    def enough(docs: list[str]) -> bool:
        return len(docs) >= t.eval_routing_docs and sum(map(len, docs)) >= wanted_chars

    domains, docs = documents_by_domain(d.data_dir, d.dataset, "validation", enough)
    loss_rows, routing_tokens, routing_domains = [], [], []
    for index, domain in enumerate(domains):
        tokens = [x for x in tokenizer.encode_batch(docs[domain]) if x.size]
        for x in tokens:
            packing.check_token_ids(x, config.model.vocab_size)
        if not tokens:
            continue
        stream = packing.documents_to_stream(tokens, [index] * len(tokens), tokenizer.eos_id, tokenizer.pad_id)
        loss_rows += packing.pack_stream(stream, d.seq_len, tokenizer.pad_id)[:rows_per_domain]
        chosen = tokens[:t.eval_routing_docs]
        routing_tokens += chosen
        routing_domains += [index] * len(chosen)
    if not loss_rows:
        raise ValueError(f"the validation split of {d.dataset!r} holds no text: rebuild the dataset with a "
                         "non-zero validation fraction.")
    routing_batches: tuple[Batch, ...] = ()
    if routing_tokens:
        batches, _ = one_document_per_row(routing_tokens, tokenizer.eos_id, tokenizer.pad_id, d.seq_len,
                                          d.global_batch_size)
        routing_batches = tuple(batches)
    return EvalSample(domains=tuple(domains), loss_batches=_batches(loss_rows, d.global_batch_size, tokenizer.pad_id),
                      routing_batches=routing_batches, routing_domains=np.asarray(routing_domains, np.int32))


def host_rows(batch: Batch) -> Batch:
    """This process's contiguous share of a global batch's rows (all of it on one host)."""
    count, index = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0]
    per_host = rows // count
    return {k: v[index * per_host:(index + 1) * per_host] for k, v in batch.items()}
