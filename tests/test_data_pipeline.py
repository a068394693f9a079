"""grain pipeline on a tiny built dataset: token accounting, host shards, exact resume."""

import json

import numpy as np
import pytest

from emo_jax.data import corpus_builder, packing, pipeline
from emo_jax.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe

WORDS = "alpha beta gamma delta river stone light shadow code compile function return".split()
N_DOCS = 90


def _text(i: int) -> str:
  rng = np.random.default_rng(i)
  return f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 120))))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A built text_files dataset (3 domains, documents up to ~6 rows long) and its tokenizer."""
  tmp = tmp_path_factory.mktemp("pipe")
  lines = [json.dumps({"text": _text(i), "domain": ["red", "green", "blue"][i % 3]}) for i in range(N_DOCS)]
  (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
  builder = corpus_builder.text_files_builder(
    tmp / "dd", corpus_builder.TextFilesConfig(name="t", paths=(str(tmp / "docs.jsonl"),), validation_fraction=0.2))
  directory = corpus_builder.build(builder)
  save_tokenizer(train_bpe([_text(i) for i in range(N_DOCS)], vocab_size=300), directory)
  return tmp / "dd", directory


def _open(dataset, split="train"):
  data_dir, directory = dataset
  source = pipeline.open_data_source(data_dir, "text_files/t", split)
  return source, load_tokenizer(directory)


def _cfg(**kw):
  base = dict(seq_len=32, batch_size=4, seed=7, num_epochs=1, drop_remainder=False, docs_per_group=8, num_threads=1)
  return pipeline.PipelineConfig(**(base | kw))


def _documents_from_batches(batches, eos_id):
  """Split the real tokens of all rows, in order, into documents at each EOS: [(tokens, domain)]."""
  tokens = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  domains = np.concatenate([b["domain_ids"][b["segment_ids"] > 0] for b in batches])
  ends = np.flatnonzero(tokens == eos_id)
  assert ends.size and ends[-1] == tokens.size - 1, "every document ends with EOS"
  docs, start = [], 0
  for end in ends:
    dom = domains[start:end + 1]
    assert (dom == dom[0]).all(), "one domain per document"
    docs.append((tuple(tokens[start:end].tolist()), int(dom[0])))
    start = end + 1
  return docs


def _expected_documents(source, tok):
  recs = [source.records[i] for i in range(len(source.records))]
  ids = tok.encode_batch([r["text"].decode() for r in recs])
  return [(tuple(t.tolist()), source.domains.index(r["domain"].decode())) for t, r in zip(ids, recs)]


def test_one_epoch_loses_and_duplicates_no_token(dataset):
  source, tok = _open(dataset)
  batches = list(pipeline.build_dataset(source.records, source.domains, tok, _cfg()))
  for b in batches:
    assert set(b) == set(packing.ROW_KEYS) and b["inputs"].shape == (4, 32)
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
  got = _documents_from_batches(batches, tok.eos_id)
  expected = _expected_documents(source, tok)
  assert sorted(got) == sorted(expected)
  assert got != expected, "documents are shuffled"
  n_tokens = sum(len(t) + 1 for t, _ in expected)
  assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == n_tokens
  assert sum(float(b["loss_mask"].sum()) for b in batches) == n_tokens - len(expected)


def test_host_shards_are_disjoint_and_complete(dataset):
  source, tok = _open(dataset)
  shards = [
    _documents_from_batches(list(pipeline.build_dataset(source.records, source.domains, tok, _cfg(shard_index=i, shard_count=3))), tok.eos_id)
    for i in range(3)
  ]
  sets = [set(s) for s in shards]
  assert all(len(s) == len(shard) for s, shard in zip(sets, shards))
  assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
  assert sorted(shards[0] + shards[1] + shards[2]) == sorted(_expected_documents(source, tok))


def test_epochs_are_reshuffled_and_seed_matters(dataset):
  source, tok = _open(dataset)
  def first_docs(seed, epochs, n):
    batches = list(pipeline.build_dataset(source.records, source.domains, tok, _cfg(seed=seed, num_epochs=epochs)))
    return [d for d, _ in _documents_from_batches(batches, tok.eos_id)][:n]
  two = first_docs(1, 2, 10_000)
  half = len(two) // 2
  assert sorted(two[:half]) == sorted(two[half:]) and two[:half] != two[half:]
  assert first_docs(1, 1, 20) == first_docs(1, 1, 20) != first_docs(2, 1, 20)


def test_resume_yields_the_same_batches(dataset):
  source, tok = _open(dataset)
  cfg = _cfg(seq_len=16, batch_size=2, num_epochs=None, drop_remainder=True)
  it = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  for _ in range(37):  # past a document boundary and mid-document
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state_to_json(it)))
  assert state["grain_state"]["skip_tokens"] > 0, "state taken in the middle of a document"
  expected = [next(it) for _ in range(120)]  # crosses an epoch boundary (~100 batches per epoch)
  resumed = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  pipeline.restore_iterator_state(resumed, state)
  for want, got in zip(expected, (next(resumed) for _ in range(120))):
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(got[k], want[k])


def test_state_file_helpers_round_trip(dataset, tmp_path):
  source, tok = _open(dataset)
  cfg = _cfg(num_epochs=None, drop_remainder=True)
  it = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  next(it)
  pipeline.save_iterator_state(tmp_path / "state.json", it)
  want = next(it)
  again = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  pipeline.load_iterator_state(tmp_path / "state.json", again)
  np.testing.assert_array_equal(next(again)["inputs"], want["inputs"])
  with pytest.raises(ValueError, match="not an iterator state"):
    pipeline.restore_iterator_state(again, {"next_index": 3})


def test_train_and_eval_iterators(dataset):
  data_dir, _ = dataset
  train = pipeline.make_train_iterator(data_dir, "text_files/t", seq_len=24, global_batch_size=6, seed=3,
                                       process_index=1, process_count=2)
  batch = next(train)
  assert batch["inputs"].shape == (3, 24)
  assert (batch["segment_ids"] > 0).all(), "training rows are fully packed"
  evals = list(pipeline.make_eval_iterator(data_dir, "text_files/t", seq_len=24, global_batch_size=4,
                                           process_index=0, process_count=1, num_batches=50))
  assert len(evals) == 50 and all(b["inputs"].shape == (4, 24) for b in evals)
  assert (evals[-1]["segment_ids"] == 0).all() and (evals[-1]["loss_mask"] == 0).all()
  with pytest.raises(ValueError, match="not divisible by 4 hosts"):
    pipeline.make_train_iterator(data_dir, "text_files/t", seq_len=8, global_batch_size=6, process_index=0, process_count=4)


def test_worker_processes_give_the_same_tokens(dataset):
  source, tok = _open(dataset)
  batches = list(pipeline.build_dataset(source.records, source.domains, tok, _cfg(num_workers=2)))
  # Each worker packs its own slice of documents, and batches of the workers interleave:
  # compare token counts rather than contiguous documents.
  got = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  expected = np.concatenate([np.r_[np.array(t, np.int32), tok.eos_id] for t, _ in _expected_documents(source, tok)])
  np.testing.assert_array_equal(np.bincount(got, minlength=300), np.bincount(expected, minlength=300))


def test_tokenizer_loading_errors(dataset, tmp_path):
  _, directory = dataset
  tok = load_tokenizer(directory)
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 300)
  assert tok.encode_batch(["a <|endoftext|> b"])[0].tolist().count(tok.eos_id) == 0, "literal EOS text is not EOS"
  assert tok.decode(tok.encode_batch(["river stone"])[0]) == "river stone"
  with pytest.raises(ValueError, match="PAD id 300 is outside the vocabulary"):
    load_tokenizer(directory, pad_id=300)
  with pytest.raises(ValueError, match="no EOS token '<eos>'"):
    load_tokenizer(directory, eos_token="<eos>")
  with pytest.raises(FileNotFoundError, match="tokenizer file"):
    load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="below 258"):
    train_bpe(["x"], vocab_size=100)


def test_unknown_domain_and_empty_documents(dataset):
  source, tok = _open(dataset)
  fn = pipeline.TokenizeDocuments(tok, source.domains)
  stream = fn([{"text": b"", "domain": b"red"}, {"text": b"\xff\xfe river", "domain": b"red"}])
  assert packing.stream_length(stream) == len(tok.encode_batch(["\ufffd\ufffd river"])[0]) + 1
  with pytest.raises(ValueError, match="domain 'purple' is not in the dataset's domains"):
    fn([{"text": b"x", "domain": b"purple"}])
