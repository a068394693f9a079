"""Text for calibration and held-out evaluation, as packed numpy batches.

Sources: local files (`.jsonl`: one document per line with a 'text' field; any other
file: one document) or the documents of one domain of a built dataset. Documents are
packed with the training packer's rules (`data.packing`: EOS ends each document,
one segment per document piece), the last batch padded with padding rows, so every
batch has the static shape [batch_size, seq_len].
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from emo_jax.data import corpus_builder, packing
from emo_jax.modular import ModularError

Batch = dict[str, np.ndarray]  # packing.ROW_KEYS -> [B, S]


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Documents of local files; raises ModularError for missing or empty ones."""
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ModularError(f"calibration file {path} does not exist; pass a .txt or .jsonl file.")
        try:  # the same reader as `emo-jax data build --inputs` (one rule for .jsonl / text)
            found = [doc.text for doc in corpus_builder.read_text_file_documents(path, "default", lambda _: None)]
        except ValueError as err:
            raise ModularError(f"{err}.") from None
        if not found:
            raise ModularError(f"calibration file {path} holds no text; give a non-empty .txt file or a "
                               ".jsonl file with 'text' fields.")
        docs.extend(found)
    return docs


def dataset_domains(data_dir: str, dataset: str) -> tuple[str, ...]:
    from emo_jax.data.pipeline import open_data_source
    return open_data_source(data_dir, dataset, "validation").domains


def domain_documents(data_dir: str, dataset: str, domain: str, split: str, limit: int | None = None) -> list[str]:
    """The first `limit` documents (record order) of `domain` in `split` of a built dataset."""
    from emo_jax.data.pipeline import open_data_source
    try:
        source = open_data_source(data_dir, dataset, split)
    except (FileNotFoundError, ValueError) as err:
        raise ModularError(f"cannot open dataset {dataset!r} in {data_dir}: {err}") from None
    if domain not in source.domains:
        raise ModularError(f"unknown domain {domain!r}; dataset {dataset!r} has: {', '.join(source.domains)}.")
    docs = []
    for i in range(len(source.records)):
        record = source.records[i]
        if record["domain"].decode() == domain:
            docs.append(record["text"].decode("utf-8", errors="replace"))
            if limit is not None and len(docs) >= limit:
                break
    if not docs:
        raise ModularError(f"domain {domain!r} has no documents in the {split!r} split of {dataset!r}.")
    return docs


def documents_by_domain(data_dir: str, dataset: str, split: str, enough: "Callable[[list[str]], bool]"
                        ) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """The documents of every domain of `split`, in record order, read in one pass that
    stops once `enough(docs)` holds for every domain. Returns (domains, docs by domain)."""
    from emo_jax.data.pipeline import open_data_source
    try:
        source = open_data_source(data_dir, dataset, split)
    except (FileNotFoundError, ValueError) as err:
        raise ModularError(f"cannot open dataset {dataset!r} in {data_dir}: {err}") from None
    docs: dict[str, list[str]] = {d: [] for d in source.domains}
    open_domains = set(source.domains)
    for i in range(len(source.records)):
        record = source.records[i]
        domain = record["domain"].decode()
        if domain in open_domains:
            docs[domain].append(record["text"].decode("utf-8", errors="replace"))
            if enough(docs[domain]):
                open_domains.discard(domain)
                if not open_domains:
                    break
    return source.domains, docs


def pack_batches(token_docs: Sequence[np.ndarray], eos_id: int, pad_id: int, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> list[Batch]:
    """Tokenised documents -> packed batches [batch_size, seq_len] (at most max_batches)."""
    token_docs = [t for t in token_docs if t.size]
    if not token_docs:
        raise ModularError("the documents tokenise to nothing; give documents with text in them.")
    stream = packing.documents_to_stream(token_docs, [0] * len(token_docs), eos_id, pad_id)
    rows = packing.pack_stream(stream, seq_len, pad_id)
    if max_batches is not None:
        rows = rows[:max_batches * batch_size]
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = packing.stack_rows(rows[start:start + batch_size])
        batches.append(packing.pad_batch(batch, batch_size, pad_id))
    return batches


def one_document_per_row(token_docs: Sequence[np.ndarray], eos_id: int, pad_id: int, seq_len: int,
                         batch_size: int) -> tuple[list[Batch], int]:
    """Each document's first seq_len tokens in a row of its own (analysis: one row = one
    document). Returns the batches and the number of real rows."""
    token_docs = [t for t in token_docs if t.size]
    rows = []
    for tokens in token_docs:
        stream = packing.documents_to_stream([tokens[:seq_len]], [0], eos_id, pad_id)
        rows.append(packing.row_from_stream(packing.slice_stream(stream, 0, min(seq_len, tokens.size + 1)),
                                            seq_len, pad_id))
    batches = [packing.pad_batch(packing.stack_rows(rows[s:s + batch_size]), batch_size, pad_id)
               for s in range(0, len(rows), batch_size)]
    return batches, len(rows)


def tokenizer_for(config) -> "TextTokenizer":  # noqa: F821
    """The tokenizer of a config's dataset (data.tokenizer, else the dataset's own)."""
    from emo_jax.data.pipeline import resolve_dataset_dir
    from emo_jax.data.tokenizer import load_tokenizer
    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer)
    if config.data.dataset == "synthetic":
        raise ModularError("this model was trained on synthetic data and has no tokenizer; pass "
                           "data.tokenizer=PATH/tokenizer.json.")
    try:
        return load_tokenizer(resolve_dataset_dir(config.data.data_dir, config.data.dataset))
    except FileNotFoundError as err:
        raise ModularError(str(err)) from None


def text_batches(texts: Sequence[str], config, max_batches: int | None = None,
                 batch_size: int | None = None) -> list[Batch]:
    """Texts -> packed batches with the config's tokenizer, seq_len and batch size."""
    tok = tokenizer_for(config)
    tokens = tok.encode_batch(list(texts))
    for t in tokens:
        packing.check_token_ids(t, config.model.vocab_size)
    return pack_batches(tokens, tok.eos_id, tok.pad_id, config.data.seq_len,
                        batch_size or config.data.global_batch_size, max_batches)
