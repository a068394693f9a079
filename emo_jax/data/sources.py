"""Collect real-text documents per domain from files that Debian and Python ship.

Each source is a function `(root, max_bytes) -> list[Document]` that reads installed
files (run `launch/install_corpus_sources.sh` first), cuts them into documents at a
natural boundary (a Bible chapter, a group of dictionary entries, a man page, a source
file), and keeps documents in a fixed pseudo-random order (hash of the document id)
until `max_bytes` of text is reached, so a capped domain is an unbiased sample.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator


@dataclasses.dataclass(frozen=True)
class Document:
  doc_id: str  # unique and stable across builds; decides the split
  domain: str
  text: str


class SourceMissingError(RuntimeError):
  """The files a source reads are not installed."""


def stable_hash(key: str) -> int:
  """A 64-bit hash that does not change between processes (unlike `hash`)."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "little")


def split_of(doc_id: str, validation_fraction: float) -> str:
  """'validation' for a fixed `validation_fraction` of document ids, else 'train'."""
  return "validation" if stable_hash("split:" + doc_id) % 1_000_000 < validation_fraction * 1_000_000 else "train"


def decode_text(data: bytes) -> str:
  """UTF-8 with invalid bytes replaced (U+FFFD); never raises."""
  return data.decode("utf-8", errors="replace")


def take_until(docs: Iterable[Document], max_bytes: int) -> list[Document]:
  """Documents in order until their UTF-8 size reaches `max_bytes` (empty ones skipped)."""
  kept, total = [], 0
  for doc in docs:
    if total >= max_bytes:
      break
    if not doc.text.strip():
      continue
    kept.append(doc)
    total += len(doc.text.encode("utf-8"))
  return kept


def hash_ordered(docs: Iterable[Document]) -> list[Document]:
  return sorted(docs, key=lambda d: stable_hash(d.doc_id))


def _files_hash_ordered(paths: Iterable[pathlib.Path], root: pathlib.Path, prefix: str) -> list[tuple[str, pathlib.Path]]:
  """(doc_id, path) sorted by hash of doc_id, so a capped read needs no full scan."""
  items = [(f"{prefix}:{p.relative_to(root).as_posix()}", p) for p in paths]
  return sorted(items, key=lambda item: stable_hash(item[0]))


def _require(path: pathlib.Path, package: str) -> None:
  if not path.exists():
    raise SourceMissingError(f"{path} not found (install Debian package '{package}')")


# ----------------------------------------------------------------------------- Bible


_VERSE_RE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def parse_bible_verses(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
  """`bible -f` output ('Ge1:1 In the beginning...') -> (chapter id, chapter text)."""
  chapter, verses = None, []
  for line in lines:
    match = _VERSE_RE.match(line.rstrip("\n"))
    if not match:
      continue
    book, chap, verse, text = match.groups()
    key = f"{book} {chap}"
    if key != chapter and verses:
      yield chapter, f"{chapter}\n\n" + "\n".join(verses) + "\n"
      verses = []
    chapter = key
    verses.append(f"{verse} {text}")
  if verses:
    yield chapter, f"{chapter}\n\n" + "\n".join(verses) + "\n"


def bible_documents(root: pathlib.Path, max_bytes: int) -> list[Document]:
  """King James Bible, one document per chapter, via the `bible` program (bible-kjv)."""
  program = shutil.which("bible", path=str(root / "usr/bin"))
  if program is None:
    raise SourceMissingError("program 'bible' not found (install Debian packages 'bible-kjv' and 'bible-kjv-text')")
  out = subprocess.run([program, "-f", "Gen1:1-Rev22:21"], capture_output=True, check=True, env={})
  docs = [Document(f"kjv:{cid}", "scripture", text) for cid, text in parse_bible_verses(decode_text(out.stdout).splitlines())]
  return take_until(hash_ordered(docs), max_bytes)


# ----------------------------------------------------------------------- dictd files

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
  """dictd's base-64 numbers in .index files (most significant digit first)."""
  value = 0
  for ch in text:
    value = value * 64 + _B64.index(ch)
  return value


def dictd_entries(index_text: str, dict_bytes: bytes) -> list[tuple[int, str]]:
  """(offset, entry text) in file order; database info entries ('00-database-*') skipped."""
  spans: set[tuple[int, int]] = set()
  for line in index_text.splitlines():
    parts = line.split("\t")
    if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
      continue
    spans.add((dictd_number(parts[1]), dictd_number(parts[2])))
  return [(off, decode_text(dict_bytes[off:off + size])) for (off, size) in sorted(spans)]


def group_entries(entries: list[tuple[int, str]], target_bytes: int) -> Iterator[tuple[int, str]]:
  """Consecutive entries joined into documents of about `target_bytes`: (first offset, text)."""
  group: list[str] = []
  first, size = 0, 0
  for offset, text in entries:
    if not group:
      first = offset
    group.append(text.strip("\n"))
    size += len(text)
    if size >= target_bytes:
      yield first, "\n\n".join(group) + "\n"
      group, size = [], 0
  if group:
    yield first, "\n\n".join(group) + "\n"


def _dictd_documents(root: pathlib.Path, name: str, package: str, domain: str, target_bytes: int) -> list[Document]:
  base = root / "usr/share/dictd"
  _require(base / f"{name}.dict.dz", package)
  _require(base / f"{name}.index", package)
  with gzip.open(base / f"{name}.dict.dz", "rb") as f:  # .dz is gzip with a random-access header
    data = f.read()
  index = decode_text((base / f"{name}.index").read_bytes())
  entries = dictd_entries(index, data)
  return [Document(f"{name}:{offset}", domain, text) for offset, text in group_entries(entries, target_bytes)]


def gcide_documents(root: pathlib.Path, max_bytes: int) -> list[Document]:
  """Webster's 1913 (GCIDE): groups of consecutive entries, about 2 KB each."""
  return take_until(hash_ordered(_dictd_documents(root, "gcide", "dict-gcide", "dictionary", 2048)), max_bytes)


def computing_glossary_documents(root: pathlib.Path, max_bytes: int) -> list[Document]:
  """FOLDOC and the Jargon File: groups of consecutive entries, about 2 KB each."""
  docs: list[Document] = []
  missing = []
  for name, package in (("foldoc", "dict-foldoc"), ("jargon", "dict-jargon")):
    try:
      docs += _dictd_documents(root, name, package, "computing_glossary", 2048)
    except SourceMissingError as err:
      missing.append(str(err))
  if not docs:
    raise SourceMissingError("; ".join(missing))
  return take_until(hash_ordered(docs), max_bytes)


# -------------------------------------------------------------------------- fortunes


def split_fortunes(text: str) -> list[str]:
  """A fortune file's cookies (separated by lines holding a single '%')."""
  cookies = re.split(r"^%\s*$", text, flags=re.MULTILINE)
  return [c.strip("\n") for c in cookies if c.strip()]


def fortune_documents(root: pathlib.Path, max_bytes: int, cookies_per_document: int = 16) -> list[Document]:
  """Fortune cookies, groups of `cookies_per_document` from one category file."""
  base = root / "usr/share/games/fortunes"
  _require(base, "fortunes")
  docs = []
  for path in sorted(base.iterdir()):
    if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
      continue
    cookies = split_fortunes(decode_text(path.read_bytes()))
    for start in range(0, len(cookies), cookies_per_document):
      text = "\n%\n".join(cookies[start:start + cookies_per_document]) + "\n"
      docs.append(Document(f"fortunes:{path.name}:{start}", "fortunes", text))
  return take_until(hash_ordered(docs), max_bytes)


# ------------------------------------------------------------------------- man pages

_TROFF_ESCAPES = {
  r"\-": "-", r"\e": "\\", r"\&": "", r"\(aq": "'", r"\(dq": '"', r"\(em": "--", r"\(en": "-",
  r"\(bu": "*", r"\(lq": '"', r"\(rq": '"', r"\(co": "(C)", r"\ ": " ", r"\~": " ", r"\c": "",
  r"\|": "", r"\^": "", r"\(ga": "`", r"\(ti": "~", r"\(ha": "^", r"\(rs": "\\", r"\(mu": "x",
}
_TROFF_ESCAPE_RE = re.compile("|".join(re.escape(k) for k in sorted(_TROFF_ESCAPES, key=len, reverse=True)))
_TROFF_FONT_RE = re.compile(r"\\f(\(..|\[[^\]]*\]|.)|\\s[+-]?\d+|\\\*(\(..|\[[^\]]*\]|.)|\\\((..)|\\\[[^\]]*\]")
_ALTERNATING = {".BR", ".RB", ".BI", ".IB", ".IR", ".RI"}
_JOINED = {".B", ".I", ".SM", ".SB", ".UR", ".MT"}


def _troff_inline(text: str) -> str:
  text = _TROFF_ESCAPE_RE.sub(lambda m: _TROFF_ESCAPES[m.group(0)], text)
  return _TROFF_FONT_RE.sub("", text)


def _macro_args(rest: str) -> list[str]:
  try:
    return shlex.split(rest, posix=True)
  except ValueError:  # unbalanced quote in the source
    return rest.split()


def troff_to_text(source: str) -> str:
  """Plain text of a man page's troff source: macros dropped, their text kept."""
  out: list[str] = []
  for line in source.splitlines():
    if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
      continue
    if line.startswith((".", "'")):
      macro, _, rest = line.partition(" ")
      if macro in (".SH", ".SS"):
        out += ["", _troff_inline(" ".join(_macro_args(rest)))]
      elif macro in _ALTERNATING:
        out.append(_troff_inline("".join(_macro_args(rest))))
      elif macro == ".IP":  # .IP tag indent
        out += _troff_inline(" ".join(_macro_args(rest)[:1])).splitlines()
      elif macro in _JOINED:
        if rest.strip():
          out.append(_troff_inline(" ".join(_macro_args(rest))))
      elif macro in (".PP", ".LP", ".P", ".sp"):
        out.append("")
      continue  # other requests (.TH .nf .RS .in ...) carry no running text
    out.append(_troff_inline(line))
  return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


MAN_PACKAGES = ("manpages", "manpages-dev")


def man_documents(root: pathlib.Path, max_bytes: int) -> list[Document]:
  """Linux man-pages project pages (English), one document per page, troff markup stripped."""
  base = root / "usr/share/man"
  paths: list[pathlib.Path] = []
  for package in MAN_PACKAGES:  # only these packages' pages, so the licence is known
    listing = root / f"var/lib/dpkg/info/{package}.list"
    if listing.exists():
      for line in listing.read_text().splitlines():
        path = root / line.lstrip("/")
        if line.startswith("/usr/share/man/man") and line.endswith(".gz") and path.is_file() and not path.is_symlink():
          paths.append(path)
  if not paths:
    raise SourceMissingError(f"no man pages of {' or '.join(MAN_PACKAGES)} (install Debian packages {', '.join(MAN_PACKAGES)})")

  def read_all() -> Iterator[Document]:
    for doc_id, path in _files_hash_ordered(paths, base, "man"):
      source = decode_text(gzip.decompress(path.read_bytes()))
      if not source.lstrip().startswith(".so "):  # a redirect to another page
        yield Document(doc_id, "manpages", troff_to_text(source))
  return take_until(read_all(), max_bytes)


# --------------------------------------------------------------------- file-per-doc


def _file_documents(paths: list[pathlib.Path], base: pathlib.Path, prefix: str, domain: str, max_bytes: int) -> list[Document]:
  def read_all() -> Iterator[Document]:
    for doc_id, path in _files_hash_ordered(paths, base, prefix):
      yield Document(doc_id, domain, decode_text(path.read_bytes()))
  return take_until(read_all(), max_bytes)


def python_docs_documents(root: pathlib.Path, max_bytes: int) -> list[Document]:
  """The Python documentation's reStructuredText sources (python3-doc), one page each."""
  sources = sorted((root / "usr/share/doc").glob("python3*/html/_sources"))
  if not sources:
    raise SourceMissingError(f"{root / 'usr/share/doc'}/python3*/html/_sources not found (install Debian package 'python3-doc')")
  base = sources[-1]
  return _file_documents(sorted(base.rglob("*.rst.txt")), base, "pydoc", "python_docs", max_bytes)


def python_code_documents(root: pathlib.Path, max_bytes: int) -> list[Document]:
  """The running interpreter's standard library source, one .py file each."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  if root != pathlib.Path("/"):
    stdlib = root / stdlib.relative_to("/")
  _require(stdlib / "os.py", f"python{sys.version_info.major}.{sys.version_info.minor}")
  skip = {"site-packages", "dist-packages", "__pycache__"}
  paths = [p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts)]
  return _file_documents(paths, stdlib, "pysrc", "python_code", max_bytes)


def license_documents(root: pathlib.Path, max_bytes: int) -> list[Document]:
  """Licence texts and Debian copyright files, exact duplicates removed."""
  paths = sorted((root / "usr/share/common-licenses").glob("*")) + sorted((root / "usr/share/doc").glob("*/copyright"))
  paths = [p for p in paths if p.is_file()]
  if not paths:
    raise SourceMissingError(f"no files under {root / 'usr/share/common-licenses'} or {root / 'usr/share/doc'}/*/copyright")
  seen, unique = set(), []
  for path in paths:
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest not in seen:
      seen.add(digest)
      unique.append(path)
  return _file_documents(unique, root / "usr/share", "license", "licenses", max_bytes)


@dataclasses.dataclass(frozen=True)
class Source:
  domain: str
  collect: Callable[[pathlib.Path, int], list[Document]]
  origin: str  # Debian package(s) or location
  license: str


SOURCES: tuple[Source, ...] = (
  Source("scripture", bible_documents, "bible-kjv, bible-kjv-text", "King James Version text: public domain"),
  Source("dictionary", gcide_documents, "dict-gcide", "GCIDE (Webster's 1913 + additions): GPL-3+"),
  Source("computing_glossary", computing_glossary_documents, "dict-foldoc, dict-jargon", "FOLDOC: GFDL-1.1+; Jargon File 4.4.7: public domain"),
  Source("fortunes", fortune_documents, "fortunes, fortunes-min", "fortune-mod: BSD-4-clause; quotations of various origin"),
  Source("manpages", man_documents, "manpages, manpages-dev", "Linux man-pages: various free licences (GPL, BSD, MIT...)"),
  Source("python_docs", python_docs_documents, "python3-doc", "PSF-2.0 (Python documentation)"),
  Source("python_code", python_code_documents, "the interpreter's standard library", "PSF-2.0"),
  Source("licenses", license_documents, "/usr/share/common-licenses, /usr/share/doc/*/copyright", "licence texts: verbatim copying permitted"),
)
DOMAINS: tuple[str, ...] = tuple(s.domain for s in SOURCES)


def collect_corpus(
  max_bytes_per_domain: int,
  domains: Iterable[str] = DOMAINS,
  root: pathlib.Path = pathlib.Path("/"),
  min_domains: int = 3,
  min_bytes_per_domain: int = 10_000,
  log: Callable[[str], None] = print,
  progress: Callable[[list[str]], Iterable[str]] = iter,
) -> dict[str, list[Document]]:
  """Documents per domain; a missing source is reported in one line and skipped.

  Raises if fewer than `min_domains` domains have at least `min_bytes_per_domain`.
  """
  by_name = {s.domain: s for s in SOURCES}
  corpus: dict[str, list[Document]] = {}
  for domain in progress(list(domains)):
    if domain not in by_name:
      raise ValueError(f"unknown domain {domain!r}; known domains: {', '.join(DOMAINS)}")
    try:
      docs = by_name[domain].collect(root, max_bytes_per_domain)
    except (SourceMissingError, OSError, subprocess.CalledProcessError) as err:
      log(f"skipping domain {domain}: {err}")
      continue
    size = sum(len(d.text.encode("utf-8")) for d in docs)
    if size < min_bytes_per_domain:
      log(f"skipping domain {domain}: only {size} bytes of text (need {min_bytes_per_domain})")
      continue
    corpus[domain] = docs
  ids = [d.doc_id for docs in corpus.values() for d in docs]
  if len(set(ids)) != len(ids):
    raise RuntimeError(f"{len(ids) - len(set(ids))} duplicate document ids: a source's document boundaries are wrong")
  if len(corpus) < min_domains:
    raise RuntimeError(
      f"only {len(corpus)} domain(s) with enough text ({', '.join(corpus) or 'none'}); need {min_domains}: "
      "run launch/install_corpus_sources.sh to install the Debian packages")
  return corpus
