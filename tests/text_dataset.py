"""For tests that run the real training loop: a small built text_files dataset (120 short
documents over 3 domains ('red', 'green', 'blue'), registered as 'text_files/<name>',
with its own 300-token BPE vocabulary), and the train losses a run logged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from emo_jax.data import corpus_builder
from emo_jax.data.tokenizer import save_tokenizer, train_bpe

WORDS = "alpha beta gamma delta river stone light shadow code compile function return".split()
DOCUMENTS = 120


def document_text(i: int) -> str:
    """Document i: 5-80 words drawn with seed i (deterministic)."""
    rng = np.random.default_rng(i)
    return f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 80))))


def build_text_dataset(tmp: Path, name: str = "loop") -> Path:
    """Builds the dataset under tmp/dd and returns that data_dir."""
    lines = [json.dumps({"text": document_text(i), "domain": ["red", "green", "blue"][i % 3]})
             for i in range(DOCUMENTS)]
    (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
    builder = corpus_builder.text_files_builder(
        tmp / "dd", corpus_builder.TextFilesConfig(name=name, paths=(str(tmp / "docs.jsonl"),),
                                                    validation_fraction=0.2))
    directory = corpus_builder.build(builder)
    save_tokenizer(train_bpe([document_text(i) for i in range(DOCUMENTS)], vocab_size=300), directory)
    return tmp / "dd"


def train_losses(run_dir: Path) -> dict[int, float]:
    """Train loss per step from run_dir/metrics.jsonl; a step logged twice (run again after
    a resume) keeps its last value."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            losses[row["step"]] = row["loss"]
    return losses
