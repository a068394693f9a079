"""grain pipeline on a tiny built dataset: token accounting, host shards, exact resume, row shuffle."""

import json

import grain
import numpy as np
import pytest

from emo_jax.data import commands, corpus_builder, mixing, packing, pipeline
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


# ------------------------------------------------------------------ row shuffle


def _rows(batches):
  """Every row of the batches as a hashable tuple of all its ROW_KEYS contents, in order."""
  return [tuple(tuple(b[k][i].tolist()) for k in packing.ROW_KEYS) for b in batches for i in range(b["inputs"].shape[0])]


def test_row_shuffle_loses_and_duplicates_no_row(dataset):
  source, tok = _open(dataset)
  plain_batches = list(pipeline.build_dataset(source.records, source.domains, tok, _cfg()))
  plain = _rows(plain_batches)
  packed = sum(int((b["segment_ids"] > 0).any(1).sum()) for b in plain_batches)  # rows before batch padding
  window = next(w for w in (10, 11, 13) if packed % w)  # doc_ids hold the tmp path: the split varies
  assert packed > 3 * window, "several windows and a final partial one"
  shuffled = _rows(pipeline.build_dataset(source.records, source.domains, tok, _cfg(shuffle_rows=window)))
  assert sorted(shuffled) == sorted(plain)
  assert shuffled != plain
  # Windows hold the same rows as the packing order, only permuted (the shuffle is local).
  for start in range(0, len(plain), window):
    assert sorted(shuffled[start:start + window]) == sorted(plain[start:start + window])
  again = _rows(pipeline.build_dataset(source.records, source.domains, tok, _cfg(shuffle_rows=window)))
  other = _rows(pipeline.build_dataset(source.records, source.domains, tok, _cfg(shuffle_rows=window, seed=8)))
  assert again == shuffled and other != shuffled


def test_window_permutation_is_a_seeded_uniform_permutation():
  perms = np.stack([pipeline.window_permutation(3, w, 6) for w in range(3000)])
  assert (np.sort(perms, axis=1) == np.arange(6)).all()
  np.testing.assert_array_equal(pipeline.window_permutation(3, 5, 6), perms[5])
  assert not np.array_equal(pipeline.window_permutation(4, 5, 1024), pipeline.window_permutation(3, 5, 1024))
  # Each row lands in each position with probability 1/6: 500 of 3000 (binomial sd ~20).
  counts = np.stack([(perms == v).sum(0) for v in range(6)])
  assert np.abs(counts - 500).max() < 100
  assert pipeline.window_permutation(0, 0, 0).shape == (0,)


@pytest.mark.parametrize("k", [7, 5])  # 28 rows: mid-window (window 2, 8 emitted); 20 rows: a window boundary
def test_row_shuffle_resumes_exactly(dataset, k):
  source, tok = _open(dataset)
  cfg = _cfg(seq_len=16, batch_size=4, num_epochs=None, drop_remainder=True, shuffle_rows=10)
  it = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  for _ in range(k):
    next(it)
  raw_state = it.get_state()
  state = json.loads(json.dumps(pipeline.iterator_state_to_json(it)))
  shuffle_state = state["grain_state"]
  assert (shuffle_state["window_index"], shuffle_state["emitted"]) == divmod(4 * k, 10)
  assert len(json.dumps(state)) < 2000, "the state holds no row contents"
  expected = [next(it) for _ in range(150)]  # ~100 batches per epoch: crosses an epoch boundary
  for restore in (lambda r: pipeline.restore_iterator_state(r, state), lambda r: r.set_state(raw_state)):
    resumed = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
    restore(resumed)
    for want, got in zip(expected, (next(resumed) for _ in range(150))):
      for key in packing.ROW_KEYS:
        np.testing.assert_array_equal(got[key], want[key])


def test_row_shuffle_resumes_at_the_end_of_a_finite_run(dataset):
  source, tok = _open(dataset)
  cfg = _cfg(shuffle_rows=10)
  batches = list(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  it = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  for _ in range(len(batches) - 2):
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state_to_json(it)))
  resumed = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  pipeline.restore_iterator_state(resumed, state)
  assert _rows(resumed) == _rows(batches[-2:])


def test_row_shuffle_with_worker_processes(dataset):
  source, tok = _open(dataset)
  cfg = _cfg(num_epochs=None, drop_remainder=True, num_workers=2, shuffle_rows=10)
  it = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state_to_json(it)))
  expected = [next(it) for _ in range(6)]
  resumed = iter(pipeline.build_dataset(source.records, source.domains, tok, cfg))
  pipeline.restore_iterator_state(resumed, state)
  assert "window_index" in json.dumps(state), "each worker's state holds its row shuffle position"
  assert _rows(next(resumed) for _ in range(6)) == _rows(expected)


def test_negative_row_shuffle_is_rejected(dataset):
  source, tok = _open(dataset)
  with pytest.raises(ValueError, match="shuffle_rows must be >= 0"):
    pipeline.build_dataset(source.records, source.domains, tok, _cfg(shuffle_rows=-1))
  with pytest.raises(ValueError, match="shuffle_rows must be >= 0"):
    pipeline.make_train_iterator(dataset[0], "text_files/t", seq_len=8, global_batch_size=2, shuffle_rows=-5,
                                 process_index=0, process_count=1)
  with pytest.raises(ValueError, match="window must be positive"):
    pipeline.ShuffledRowsIterDataset(grain.MapDataset.source([1, 2]).to_iter_dataset(), 0, seed=0)


MIX_DOMAINS = ("ant", "bee", "cat", "dog", "eel", "fox")
MIX_DOCS_PER_DOMAIN = 30


@pytest.fixture(scope="module")
def mix_dataset(tmp_path_factory):
  """6 domains x 30 documents of ~230 tokens: with 16-token rows a document spans ~15 rows,
  so 16 consecutive rows hold ~2 documents (~2 domains), like 256-token rows of the real corpus."""
  tmp = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(60, 140)))) for _ in range(len(MIX_DOMAINS) * MIX_DOCS_PER_DOMAIN)]
  lines = [json.dumps({"text": t, "domain": MIX_DOMAINS[i // MIX_DOCS_PER_DOMAIN]}) for i, t in enumerate(texts)]
  (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
  builder = corpus_builder.text_files_builder(
    tmp / "dd", corpus_builder.TextFilesConfig(name="m", paths=(str(tmp / "docs.jsonl"),), validation_fraction=0.05))
  directory = corpus_builder.build(builder)
  save_tokenizer(train_bpe(texts, vocab_size=300), directory)
  return tmp / "dd", directory


def _mix_counts(dataset, shuffle_rows):
  data_dir, directory = dataset
  source = pipeline.open_data_source(data_dir, "text_files/m", "train")
  cfg = pipeline.PipelineConfig(seq_len=16, batch_size=16, seed=5, num_epochs=1, drop_remainder=False,
                                docs_per_group=8, num_threads=1, shuffle_rows=shuffle_rows)
  batches = pipeline.build_dataset(source.records, source.domains, load_tokenizer(directory), cfg)
  return np.stack([mixing.domain_token_counts(b, len(source.domains)) for b in batches])


def test_row_shuffle_mixes_domains_in_every_batch(mix_dataset):
  plain = _mix_counts(mix_dataset, 0)
  shuffled = _mix_counts(mix_dataset, 512)  # ~35 documents per window; ~5 windows in the epoch
  assert plain.shape == shuffled.shape and plain.shape[0] > 60
  corpus = plain.sum(0)  # the whole epoch: the train split's token shares
  np.testing.assert_array_equal(shuffled.sum(0), corpus)
  plain, shuffled = plain[:-1], shuffled[:-1]  # the last batch is partly padding
  # The ideal: 16 rows drawn iid from the corpus's token shares. Its expected TV distance
  # (~0.23 for 6 about equal domains, simulated) is the multinomial noise of 16 draws. A
  # window of 512 rows holds ~35 documents, whose own mix adds a variance of ~16/35 of the
  # 16-row one: TV ~ sqrt(1 + 16/35) ~ 1.2x the ideal (measured 0.26), so require < 1.5x.
  # (A 64-row window, ~4 documents, measures 2x and fails.) Unshuffled batches hold ~2
  # documents, hence ~2 domains: TV ~0.7, over 3x the ideal; require > 2.5x.
  p = corpus / corpus.sum()
  iid = np.random.default_rng(0).multinomial(16, p, size=20_000) / 16  # [N, D] shares of 16 iid rows
  ideal = 0.5 * np.abs(iid - p).sum(1).mean()
  assert mixing.iid_rows_reference(corpus, rows_per_batch=16)["tv_mean"] == pytest.approx(ideal, rel=0.05)
  plain_stats, shuffled_stats = mixing.summarize(plain, corpus), mixing.summarize(shuffled, corpus)
  assert 0.15 < ideal < 0.3
  assert shuffled_stats["tv_mean"] < 1.5 * ideal
  assert plain_stats["tv_mean"] > 2.5 * ideal
  assert shuffled_stats["domains_mean"] > plain_stats["domains_mean"] + 2
  assert shuffled_stats["largest_share_mean"] < plain_stats["largest_share_mean"] - 0.2


def test_mixing_summary_numbers():
  counts = np.array([[3, 1, 0], [0, 0, 4], [0, 0, 0]])  # the all-padding batch is left out
  got = mixing.summarize(counts, np.array([2.0, 1.0, 1.0]))
  assert got["batches"] == 2 and (got["domains_min"], got["domains_max"]) == (1, 2) and got["domains_mean"] == 1.5
  assert got["largest_share_mean"] == pytest.approx(0.875) and got["largest_share_max"] == 1.0
  assert got["tv_mean"] == pytest.approx((0.25 + 0.75) / 2) and got["tv_max"] == pytest.approx(0.75)
  batch = {"segment_ids": np.array([[1, 1, 0], [1, 2, 2]]), "domain_ids": np.array([[2, 2, -1], [0, 1, 1]])}
  np.testing.assert_array_equal(mixing.domain_token_counts(batch, 3), [1, 2, 2])


def test_stats_command_reports_batch_mixing(mix_dataset, tmp_path, capsys):
  data_dir, _ = mix_dataset
  config = tmp_path / "mix.yaml"
  config.write_text(f"data:\n  dataset: text_files/m\n  data_dir: {data_dir}\n  seq_len: 16\n"
                    "  global_batch_size: 16\n  seed: 2\n  shuffle_rows: 512\n")
  out = tmp_path / "mix.json"
  assert commands.stats_main(["--config", str(config), "--batches", "80", "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "shuffle_rows=512" in printed and "shuffle_rows=0" in printed and "TV to corpus mix, mean" in printed
  result = json.loads(out.read_text())
  assert result["batches"] == 80 and set(result["corpus_token_shares"]) == set(MIX_DOMAINS)
  assert sum(result["corpus_token_shares"].values()) == pytest.approx(1.0)
  shuffled, plain, ideal = (result["columns"][k] for k in ("shuffle_rows=512", "shuffle_rows=0", "iid rows (ideal)"))
  assert shuffled["batches"] == plain["batches"] == 80
  # 80 batches span only ~2.5 windows, whose own mix varies with the fixture's split
  # (doc_ids hold the tmp path): looser bounds than the full-epoch test above.
  assert shuffled["tv_mean"] < 2 * ideal["tv_mean"] and plain["tv_mean"] > 2.5 * ideal["tv_mean"]
  assert shuffled["domains_mean"] > plain["domains_mean"] + 1.5
  # The numbers are those of the training iterator itself.
  source = pipeline.open_data_source(data_dir, "text_files/m", "train")
  it = pipeline.make_train_iterator(data_dir, "text_files/m", seq_len=16, global_batch_size=16, seed=2, shuffle_rows=512,
                                    process_index=0, process_count=1)
  shares = np.array([result["corpus_token_shares"][d] for d in source.domains])
  assert mixing.batch_mixing((next(it) for _ in range(80)), len(source.domains), shares) == pytest.approx(shuffled)
  assert commands.stats_main(["--config", str(tmp_path / "missing.yaml")]) == 1
