"""TFDS builders from tiny temporary inputs, and the build/stats commands."""

import json
import pathlib

import pytest
import tensorflow_datasets as tfds

from emo_jax.data import commands, corpus_builder
from test_data_sources import make_fake_root


def _records(directory: pathlib.Path, split: str) -> list[dict]:
  source = tfds.builder_from_directory(str(directory)).as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _build_files(tmp_path, paths, name="mine", validation_fraction=0.3):
  messages = []
  builder = corpus_builder.text_files_builder(
    tmp_path / "dd", corpus_builder.TextFilesConfig(name=name, paths=tuple(map(str, paths)), validation_fraction=validation_fraction))
  builder.log = messages.append
  return corpus_builder.build(builder), messages


def test_text_files_builder_jsonl_and_txt(tmp_path):
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_bytes(b'{"text": "first doc", "domain": "news"}\n\n{"text": ""}\n{"text": "caf\xe9 \xff bytes", "domain": "code"}\n'
                    + b"".join(b'{"text": "doc %d"}\n' % i for i in range(30)))
  txt = tmp_path / "b.txt"
  txt.write_text("a whole file is one document\nwith two lines\n")
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  directory, messages = _build_files(tmp_path, [jsonl, txt, empty])
  assert directory == tmp_path / "dd/text_files/mine/1.0.0"
  records = _records(directory, "train") + _records(directory, "validation")
  assert len(records) == 1 + 1 + 30 + 1  # the empty JSONL document and the empty file are skipped
  assert 0 < len(_records(directory, "validation")) < len(records)
  by_id = {r["doc_id"].decode(): r for r in records}
  assert by_id[f"{jsonl}:4"]["text"].decode() == "caf\ufffd \ufffd bytes"
  assert by_id[f"{jsonl}:4"]["domain"] == b"code"
  assert by_id[str(txt)]["text"].decode() == "a whole file is one document\nwith two lines\n"
  assert by_id[str(txt)]["domain"] == b"default"
  assert tfds.builder_from_directory(str(directory)).info.metadata["domains"] == ["code", "default", "news"]
  assert any("empty.txt: the file is empty" in m for m in messages)
  assert any("skipped 1 empty document" in m for m in messages)
  assert any("invalid UTF-8" in m for m in messages)


def test_text_files_builder_errors_are_clear(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="no non-empty documents"):
    _build_files(tmp_path, [empty], name="e1")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": broken\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    _build_files(tmp_path, [bad], name="e2")
  no_text = tmp_path / "notext.jsonl"
  no_text.write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match="string 'text' field"):
    _build_files(tmp_path, [no_text], name="e3")
  with pytest.raises(FileNotFoundError, match="input file"):
    _build_files(tmp_path, [tmp_path / "nope.txt"], name="e4")


def test_emo_corpus_builder_on_fake_root(tmp_path):
  root = make_fake_root(tmp_path / "root")
  config = corpus_builder.EmoCorpusConfig(name="tiny", max_bytes_per_domain=20_000, validation_fraction=0.2,
                                          source_root=str(root), min_bytes_per_domain=100)
  builder = corpus_builder.emo_corpus_builder(tmp_path / "dd", config)
  messages = []
  builder.log = messages.append
  directory = corpus_builder.build(builder)
  info = tfds.builder_from_directory(str(directory)).info
  assert info.metadata["domains"] == ["computing_glossary", "fortunes", "licenses"]
  assert info.metadata["sources"]["fortunes"]["license"]
  records = _records(directory, "train") + _records(directory, "validation")
  assert {r["domain"].decode() for r in records} == set(info.metadata["domains"])
  assert len({r["doc_id"] for r in records}) == len(records)
  assert len(messages) == 5  # one line per missing domain


def test_build_and_stats_commands(tmp_path, capsys):
  jsonl = tmp_path / "c.jsonl"
  jsonl.write_text("".join(json.dumps({"text": f"document {i} " + "word " * (i % 7), "domain": "ab"[i % 2]}) + "\n" for i in range(80)))
  data_dir = tmp_path / "dd"
  assert commands.build_main(["--data-dir", str(data_dir), "--inputs", str(jsonl), "--name", "c", "--vocab-size", "300"]) == 0
  directory = data_dir / "text_files/c/1.0.0"
  assert (directory / "tokenizer.json").is_file()
  capsys.readouterr()
  assert commands.stats_main(["--data-dir", str(data_dir), "--dataset", "text_files/c", "--json", str(tmp_path / "s.json")]) == 0
  out = capsys.readouterr().out
  assert "documents" in out and "TOTAL" in out
  stats = json.loads((tmp_path / "s.json").read_text())
  assert sum(c["documents"] for split in stats.values() for c in split.values()) == 80
  total_bytes = sum(len(f"document {i} " + "word " * (i % 7)) for i in range(80))
  assert sum(c["bytes"] for split in stats.values() for c in split.values()) == total_bytes


def test_build_command_reports_errors(tmp_path, capsys):
  empty = tmp_path / "e.txt"
  empty.write_text("")
  assert commands.build_main(["--data-dir", str(tmp_path / "dd"), "--inputs", str(empty)]) == 1
  assert "no non-empty documents" in capsys.readouterr().err
  assert commands.stats_main(["--data-dir", str(tmp_path / "nowhere")]) == 1
  assert "run `emo-jax data build`" in capsys.readouterr().err


@pytest.mark.slow
def test_build_real_corpus(tmp_path):
  """The bundled corpus from the installed Debian packages (launch/install_corpus_sources.sh)."""
  assert commands.build_main(["--data-dir", str(tmp_path), "--max-bytes-per-domain", "300000", "--vocab-size", "1024"]) == 0
  info = tfds.builder_from_directory(str(tmp_path / "emo_corpus/default/1.0.0")).info
  assert len(info.metadata["domains"]) >= 5


def test_empty_validation_split_is_left_out(tmp_path):
  one = tmp_path / "one.txt"
  one.write_text("a single document")
  directory, messages = _build_files(tmp_path, [one], name="one", validation_fraction=0.0)
  assert list(tfds.builder_from_directory(str(directory)).info.splits) == ["train"]
  assert any("building train only" in m for m in messages)
  from emo_jax.data import pipeline

  with pytest.raises(ValueError, match="split 'validation' not in"):
    pipeline.open_data_source(tmp_path / "dd", "text_files/one", "validation")
  with pytest.raises(ValueError, match="no document falls in the train split"):
    _build_files(tmp_path, [one], name="none", validation_fraction=1.0)


def test_one_document_build_works_whatever_its_path_hashes_to(tmp_path):
  """A one-document build used to fail for the ~5% of paths whose hash put the document
  in validation ('no document falls in the train split')."""
  from emo_jax.data import sources
  names = (tmp_path / f"doc{i}.txt" for i in range(10_000))
  unlucky = next(p for p in names if sources.split_of(str(p), 0.05) == "validation")
  unlucky.write_text("the only document")
  directory, messages = _build_files(tmp_path, [unlucky], name="unlucky", validation_fraction=0.05)
  assert list(tfds.builder_from_directory(str(directory)).info.splits) == ["train"]
  assert [r["text"].decode() for r in _records(directory, "train")] == ["the only document"]
  assert any("goes to train" in m for m in messages), messages


def test_split_assignment_moves_one_document_only_when_train_would_be_empty():
  from emo_jax.data import sources
  ids = [f"doc{i}" for i in range(200)]
  splits, split_of = corpus_builder.nonempty_splits(ids, 0.3, lambda _: None)
  assert splits == ["train", "validation"]
  assert all(split_of(d) == sources.split_of(d, 0.3) for d in ids)  # the hash split, unchanged
  validation_only = [d for d in ids if sources.split_of(d, 0.3) == "validation"][:3]
  splits, split_of = corpus_builder.nonempty_splits(validation_only, 0.3, lambda _: None)
  assert splits == ["train", "validation"] and sum(split_of(d) == "train" for d in validation_only) == 1


def test_missing_dataset_error_names_the_train_setting(tmp_path):
  """`emo-jax train` has no --data-dir; the message must name data.data_dir too."""
  from emo_jax.data import pipeline
  with pytest.raises(FileNotFoundError) as info:
    pipeline.resolve_dataset_dir(tmp_path / "nowhere", "emo_corpus")
  assert "data.data_dir=" in str(info.value) and "--data-dir" in str(info.value)
