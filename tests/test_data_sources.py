"""Document boundaries of each source, on tiny fake Debian trees (tmp_path)."""

import gzip
import pathlib

import pytest

from emo_jax.data import sources

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
  out = ""
  while True:
    out = _B64[n % 64] + out
    n //= 64
    if not n:
      return out


def write_dictd(base: pathlib.Path, name: str, entries: list[tuple[str, str]]) -> None:
  base.mkdir(parents=True, exist_ok=True)
  data, index = b"", ["00-database-info\tA\tB"]
  for head, text in entries:
    body = text.encode()
    index.append(f"{head}\t{_b64(len(data))}\t{_b64(len(body))}")
    data += body
  (base / f"{name}.dict.dz").write_bytes(gzip.compress(data))
  (base / f"{name}.index").write_text("\n".join(index) + "\n")


def make_fake_root(root: pathlib.Path) -> pathlib.Path:
  """Fortunes, FOLDOC and licences; nothing else (so other domains are missing)."""
  fortunes = root / "usr/share/games/fortunes"
  fortunes.mkdir(parents=True)
  (fortunes / "wisdom").write_text("%\n".join(f"Cookie number {i} says hello.\n" for i in range(40)))
  (fortunes / "wisdom.dat").write_bytes(b"\x00\x01binary")
  write_dictd(root / "usr/share/dictd", "foldoc", [(f"term{i}", f"term{i}\n\n   A computing term {i}.\n\n") for i in range(300)])
  lic = root / "usr/share/common-licenses"
  lic.mkdir(parents=True)
  for i in range(5):
    (lic / f"L{i}").write_text(f"Licence {i}: permission is granted to copy.\n" * 50)
  (lic / "DUP").write_text("Licence 0: permission is granted to copy.\n" * 50)  # exact duplicate of L0
  return root


def test_dictd_numbers_and_entries():
  assert sources.dictd_number("A") == 0 and sources.dictd_number("BA") == 64 and sources.dictd_number("K5") == 10 * 64 + 57
  index = "00-database-url\tA\tD\nb\tD\tD\na\tA\tD\n"  # file order differs from index order
  assert sources.dictd_entries(index, b"aa\nbb\n") == [(0, "aa\n"), (3, "bb\n")]


def test_dictd_entries_deduplicate_aliases_and_group():
  data = b"alpha text\nbeta text\n"
  index = "alpha\tA\tK\nALPHA\tA\tK\nbeta\tK\tK\n"  # two headwords for one entry
  entries = sources.dictd_entries(index, data)
  assert entries == [(0, "alpha text"), (10, "\nbeta text")]
  groups = list(sources.group_entries(entries, target_bytes=5))
  assert [g[0] for g in groups] == [0, 10]
  assert list(sources.group_entries(entries, target_bytes=10_000)) == [(0, "alpha text\n\nbeta text\n")]


def test_split_fortunes():
  assert sources.split_fortunes("one\n%\ntwo\nlines\n%\n\n%\n") == ["one", "two\nlines"]


def test_troff_to_text_keeps_words_drops_markup():
  src = '.\\" comment\n.TH FOO 1\n.SH NAME\nfoo \\- do \\fBthings\\fR\n.BR bar (1),\n.IP "\\-x" 4\nflag text\n'
  text = sources.troff_to_text(src)
  assert "comment" not in text and ".TH" not in text and "\\f" not in text
  assert "NAME" in text and "foo - do things" in text and "bar(1)," in text and "-x" in text and "flag text" in text


def test_parse_bible_verses_groups_chapters():
  lines = ["Ge1:1 In the beginning.", "Ge1:2 And the earth.", "Ge2:1 Thus.", "noise", "1Jn1:1 That which."]
  chapters = list(sources.parse_bible_verses(lines))
  assert [c for c, _ in chapters] == ["Ge 1", "Ge 2", "1Jn 1"]
  assert chapters[0][1] == "Ge 1\n\n1 In the beginning.\n2 And the earth.\n"


def test_split_is_deterministic_and_near_fraction():
  ids = [f"doc{i}" for i in range(4000)]
  splits = [sources.split_of(i, 0.1) for i in ids]
  assert splits == [sources.split_of(i, 0.1) for i in ids]
  assert 300 < splits.count("validation") < 500


def test_take_until_caps_and_skips_empty():
  docs = [sources.Document(f"d{i}", "x", "" if i == 0 else "abcd") for i in range(10)]
  kept = sources.take_until(docs, max_bytes=10)
  assert [d.doc_id for d in kept] == ["d1", "d2", "d3"]


def test_collect_corpus_reports_missing_sources(tmp_path):
  root = make_fake_root(tmp_path)
  messages = []
  corpus = sources.collect_corpus(10_000, root=root, min_bytes_per_domain=100, log=messages.append)
  assert set(corpus) == {"fortunes", "computing_glossary", "licenses"}
  missing = {m.split(":")[0] for m in messages}
  assert missing == {f"skipping domain {d}" for d in ("scripture", "dictionary", "manpages", "python_docs", "python_code")}
  assert all("install" in m for m in messages)
  assert len(corpus["licenses"]) == 5  # duplicate removed
  assert len(corpus["fortunes"]) == 3  # 40 cookies, 16 per document
  for domain, docs in corpus.items():
    assert all(d.domain == domain and d.text.strip() for d in docs)


def test_collect_corpus_caps_bytes_per_domain(tmp_path):
  root = make_fake_root(tmp_path)
  corpus = sources.collect_corpus(3000, root=root, min_bytes_per_domain=100, log=lambda m: None)
  for docs in corpus.values():
    size = sum(len(d.text.encode()) for d in docs)
    assert size - len(docs[-1].text.encode()) < 3000  # stops at the first document past the cap


def test_collect_corpus_fails_with_too_few_domains(tmp_path):
  root = make_fake_root(tmp_path)
  with pytest.raises(RuntimeError, match="only 2 domain"):
    sources.collect_corpus(10_000, domains=["fortunes", "licenses", "scripture"], root=root,
                           min_bytes_per_domain=100, log=lambda m: None)
  with pytest.raises(RuntimeError, match="only 0 domain"):
    sources.collect_corpus(10_000, root=root, min_bytes_per_domain=10**9, log=lambda m: None)


def test_unknown_domain_is_named(tmp_path):
  with pytest.raises(ValueError, match="unknown domain 'poetry'"):
    sources.collect_corpus(1000, domains=["poetry"], root=tmp_path)
