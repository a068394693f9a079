"""Packing invariants (pure numpy), checked against the documents that went in."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_jax.data import packing

EOS, PAD = 0, 1


def _docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(2, 50, size=n).astype(np.int32) for n in lengths]


def _check_rows(rows, docs, domains, seq_len):
  """Every invariant of the row contract, and that the rows hold exactly the documents."""
  flat_inputs, flat_domains = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
  for row in rows:
    seg, pos, mask = row["segment_ids"], row["positions"], row["loss_mask"]
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
    assert (np.diff(seg[:n]) >= 0).all() and (n == 0 or seg[0] == 1), "segment ids non-decreasing from 1"
    assert (np.diff(seg[:n]) <= 1).all()
    starts = np.r_[True, np.diff(seg[:n]) > 0]
    assert (pos[:n][starts] == 0).all()
    inner = np.flatnonzero(~starts)
    assert (pos[:n][inner] == pos[:n][inner - 1] + 1).all(), "positions count up inside a segment"
    assert (pos[n:] == 0).all() and (mask[n:] == 0).all() and (row["domain_ids"][n:] == -1).all()
    assert (row["inputs"][n:] == PAD).all()
    # An EOS is never followed by a token of the same segment: it ends its document.
    eos_at = np.flatnonzero(row["inputs"][:n] == EOS)
    for i in eos_at:
      assert mask[i] == 0 and row["targets"][i] == PAD
      assert i + 1 == n or seg[i + 1] == seg[i] + 1
    # Where the mask is 1 the target is the next input of the same document.
    flat_inputs.append(row["inputs"][:n])
    flat_domains.append(row["domain_ids"][:n])
  stream = np.concatenate(flat_inputs)
  expected = np.concatenate([np.r_[d, EOS] for d in docs]) if docs else np.zeros(0, np.int32)
  np.testing.assert_array_equal(stream, expected)  # nothing lost, duplicated or reordered
  expected_domains = np.concatenate([np.full(len(d) + 1, dom) for d, dom in zip(docs, domains)]) if docs else stream
  np.testing.assert_array_equal(np.concatenate(flat_domains), expected_domains)
  targets = np.concatenate([np.zeros(0, np.int32)] + [r["targets"][r["segment_ids"] > 0] for r in rows])
  mask = np.concatenate([np.zeros(0, bool)] + [r["loss_mask"][r["segment_ids"] > 0] > 0 for r in rows])
  np.testing.assert_array_equal(targets[mask], stream[1:][mask[:-1]])  # targets valid across row cuts
  assert mask.sum() == sum(len(d) for d in docs)  # one predicted token per non-EOS token


def test_small_example_by_hand():
  docs = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
  rows = packing.pack_stream(packing.documents_to_stream(docs, [0, 3], EOS, PAD), seq_len=4, pad_id=PAD)
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["inputs"], [5, 6, 7, EOS])
  np.testing.assert_array_equal(rows[0]["targets"], [6, 7, EOS, PAD])
  np.testing.assert_array_equal(rows[0]["loss_mask"], [1, 1, 1, 0])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1])
  np.testing.assert_array_equal(rows[1]["inputs"], [8, EOS, PAD, PAD])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 0, 0])
  np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 0, 0])
  np.testing.assert_array_equal(rows[1]["domain_ids"], [3, 3, -1, -1])


def test_document_split_across_rows_keeps_targets():
  docs = [np.arange(2, 12, dtype=np.int32)]  # 10 tokens + EOS over rows of 4
  rows = packing.pack_stream(packing.documents_to_stream(docs, [0], EOS, PAD), seq_len=4, pad_id=PAD)
  np.testing.assert_array_equal(rows[0]["targets"], [3, 4, 5, 6])  # last target is the next row's first input
  np.testing.assert_array_equal(rows[1]["inputs"][:1], [6])
  np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3])  # a new piece is a new segment
  np.testing.assert_array_equal(rows[2]["segment_ids"], [1, 1, 1, 0])


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=0, max_size=12), seq_len=st.integers(1, 33), seed=st.integers(0, 99))
def test_packing_invariants(lengths, seq_len, seed):
  docs = _docs(lengths, seed)
  domains = [i % 3 for i in range(len(docs))]
  rows = packing.pack_stream(packing.documents_to_stream(docs, domains, EOS, PAD), seq_len, PAD)
  assert len(rows) == -(-sum(n + 1 for n in lengths) // seq_len)
  for r in rows:
    assert all(r[k].shape == (seq_len,) for k in packing.ROW_KEYS)
  _check_rows(rows, docs, domains, seq_len)


def test_pad_batch_and_stack():
  rows = packing.pack_stream(packing.documents_to_stream(_docs([5]), [1], EOS, PAD), 8, PAD)
  batch = packing.pad_batch(packing.stack_rows(rows), batch_size=3, pad_id=PAD)
  assert batch["inputs"].shape == (3, 8) and batch["inputs"].dtype == np.int32
  assert batch["loss_mask"].dtype == np.float32
  assert (batch["segment_ids"][1:] == 0).all() and (batch["domain_ids"][1:] == -1).all()


def test_segments_ending_at_eos_matches_packer():
  docs = _docs([3, 0, 6, 2], seed=1)
  rows = packing.pack_stream(packing.documents_to_stream(docs, [0] * 4, EOS, PAD), seq_len=64, pad_id=PAD)
  seg = rows[0]["segment_ids"]
  n = int((seg > 0).sum())
  np.testing.assert_array_equal(packing.segments_ending_at_eos(rows[0]["inputs"][:n], EOS), seg[:n])


def test_token_id_beyond_vocabulary_is_named():
  with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
    packing.check_token_ids(np.array([1, 300], np.int32), vocab_size=256)
  packing.check_token_ids(np.array([0, 255], np.int32), vocab_size=256)
