"""TFDS builders (array_record, offline, no tensorflow) for the bundled corpus and user files.

Both write features {text, domain, doc_id} to train/validation splits chosen by a hash
of the document id, and store the ordered domain list in `info.metadata["domains"]`
(the index of a domain there is the `domain_ids` value in batches). Read them back with
`tfds.builder_from_directory(...).as_data_source(split)` (see pipeline.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterator

import tensorflow_datasets as tfds
import tqdm
from etils import epath

from emo_jax.data import sources

VERSION = "1.0.0"
FILE_FORMAT = "array_record"


def default_data_dir() -> pathlib.Path:
  """$EMO_JAX_DATA_DIR, else `data_cache/` at the repository root (gitignored), else ./data_cache."""
  if os.environ.get("EMO_JAX_DATA_DIR"):
    return pathlib.Path(os.environ["EMO_JAX_DATA_DIR"])
  repo = pathlib.Path(__file__).resolve().parents[2]
  return (repo if (repo / "pyproject.toml").exists() else pathlib.Path.cwd()) / "data_cache"


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: no download, no checksums file."""

  # TFDS looks up a checksums file next to the builder's code through
  # `importlib_resources` (not installed): name the code file directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


def nonempty_splits(doc_ids: list[str], validation_fraction: float,
                    log: Callable[[str], None]) -> tuple[list[str], Callable[[str], str]]:
  """The splits that get documents (TFDS cannot write an empty split, so it is left out)
  and the split of each document id.

  Documents go to validation by a hash of their id. When that leaves train empty and
  validation_fraction < 1 (a one-document build has a `validation_fraction` chance of
  it), the document with the largest hash goes to train instead: whether a small build
  works must not depend on its file names.
  """
  splits = {doc_id: sources.split_of(doc_id, validation_fraction) for doc_id in doc_ids}
  if doc_ids and validation_fraction < 1 and "train" not in splits.values():
    moved = max(doc_ids, key=lambda d: sources.stable_hash("split:" + d) % 1_000_000)
    splits[moved] = "train"
    log(f"every document hashed into validation ({len(doc_ids)} documents, fraction {validation_fraction}): "
        f"{moved} goes to train")
  counts = {"train": 0, "validation": 0}
  for split in splits.values():
    counts[split] += 1
  if not counts["train"]:
    raise ValueError(f"no document falls in the train split ({len(doc_ids)} documents): add documents or lower validation_fraction")
  if not counts["validation"]:
    log(f"no document falls in the validation split ({len(doc_ids)} documents, fraction {validation_fraction}): building train only")
  return [split for split, n in counts.items() if n], splits.__getitem__


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
    "text": tfds.features.Text(),
    "domain": tfds.features.Text(),
    "doc_id": tfds.features.Text(),
  })


@dataclasses.dataclass(eq=False)
class EmoCorpusConfig(tfds.core.BuilderConfig):
  """Bundled corpus settings; a different `name` gives a separate dataset directory."""

  max_bytes_per_domain: int = 3_000_000
  validation_fraction: float = 0.05
  domains: tuple[str, ...] = sources.DOMAINS
  source_root: str = "/"  # where the Debian files live (tests point it at a temporary tree)
  min_domains: int = 3
  min_bytes_per_domain: int = 10_000


class EmoCorpus(_LocalBuilder):
  """Real text in several domains from Debian/PyPI-shipped files (see sources.SOURCES)."""

  VERSION = tfds.core.Version(VERSION)
  log: Callable[[str], None] = print

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Multi-domain text from Debian packages and the Python standard library.",
      features=_features(),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    cfg: EmoCorpusConfig = self.builder_config
    corpus = sources.collect_corpus(
      cfg.max_bytes_per_domain, cfg.domains, pathlib.Path(cfg.source_root),
      min_domains=cfg.min_domains, min_bytes_per_domain=cfg.min_bytes_per_domain, log=self.log,
      progress=lambda names: tqdm.tqdm(names, desc="collecting domains", unit="domain"))
    by_domain = {s.domain: s for s in sources.SOURCES}
    self.info.metadata["domains"] = list(corpus)
    self.info.metadata["sources"] = {d: {"origin": by_domain[d].origin, "license": by_domain[d].license} for d in corpus}
    docs = [doc for domain_docs in corpus.values() for doc in domain_docs]
    splits, split_of = nonempty_splits([d.doc_id for d in docs], cfg.validation_fraction, self.log)
    return {split: self._generate_examples(docs, split, split_of) for split in splits}

  def _generate_examples(self, docs: list[sources.Document], split: str, split_of: Callable[[str], str]):
    for doc in docs:
      if split_of(doc.doc_id) == split:
        yield doc.doc_id, {"text": doc.text, "domain": doc.domain, "doc_id": doc.doc_id}


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """A user's files: .jsonl (one document per line, `text` and optional `domain` fields) or
  any other file read as text (one document per file, domain = `default_domain`)."""

  paths: tuple[str, ...] = ()
  validation_fraction: float = 0.05
  default_domain: str = "default"


def read_text_file_documents(path: pathlib.Path, default_domain: str, log: Callable[[str], None]) -> Iterator[sources.Document]:
  """Documents of one input file; empty documents and files are reported and skipped."""
  data = path.read_bytes()
  if not data.strip():
    log(f"skipping {path}: the file is empty")
    return
  text = sources.decode_text(data)
  if "\ufffd" in text and b"\xef\xbf\xbd" not in data:
    log(f"{path}: invalid UTF-8 bytes replaced by U+FFFD")
  if path.suffix != ".jsonl":
    yield sources.Document(str(path), default_domain, text)
    return
  empty = 0
  for line_no, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}); fix or remove the line") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise ValueError(f"{path}:{line_no}: expected a JSON object with a string 'text' field")
    if not record["text"].strip():
      empty += 1
      continue
    yield sources.Document(f"{path}:{line_no}", str(record.get("domain", default_domain)), record["text"])
  if empty:
    log(f"{path}: skipped {empty} empty document(s)")


class TextFiles(_LocalBuilder):
  """A dataset from local .txt/.jsonl files; name it with `TextFilesConfig(name=..., paths=...)`."""

  VERSION = tfds.core.Version(VERSION)
  log: Callable[[str], None] = print

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self, description="User-provided text files.", features=_features(), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    cfg: TextFilesConfig = self.builder_config
    paths = [pathlib.Path(p) for p in dict.fromkeys(cfg.paths)]  # a file given twice is read once
    if not paths:
      raise ValueError("no input files: pass one or more .txt/.jsonl paths")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
      raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    # One pass to learn the domains (stored in metadata before any example is written).
    domains, doc_ids = set(), []
    for path in paths:
      for doc in read_text_file_documents(path, cfg.default_domain, self.log):
        domains.add(doc.domain)
        doc_ids.append(doc.doc_id)
    if not doc_ids:
      raise ValueError(f"no non-empty documents in {', '.join(map(str, paths))}: check the files' contents")
    self.info.metadata["domains"] = sorted(domains)
    splits, split_of = nonempty_splits(doc_ids, cfg.validation_fraction, self.log)
    return {split: self._generate_examples(paths, split, cfg, split_of) for split in splits}

  def _generate_examples(self, paths: list[pathlib.Path], split: str, cfg: TextFilesConfig,
                         split_of: Callable[[str], str]):
    quiet = lambda _: None  # already reported during the first pass
    for path in paths:
      for doc in read_text_file_documents(path, cfg.default_domain, quiet):
        if split_of(doc.doc_id) == split:
          yield doc.doc_id, {"text": doc.text, "domain": doc.domain, "doc_id": doc.doc_id}


def build(builder: tfds.core.GeneratorBasedBuilder) -> pathlib.Path:
  """Generate the dataset offline (no GCS, no download); returns its directory."""
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  return pathlib.Path(builder.data_dir)


def emo_corpus_builder(data_dir: str | os.PathLike, config: EmoCorpusConfig) -> EmoCorpus:
  return EmoCorpus(data_dir=str(data_dir), config=config, file_format=FILE_FORMAT)


def text_files_builder(data_dir: str | os.PathLike, config: TextFilesConfig) -> TextFiles:
  return TextFiles(data_dir=str(data_dir), config=config, file_format=FILE_FORMAT)
