"""Selective expert use: keep a few experts for one domain
(docs/algorithm.md#selective-expert-use-and-pruning, #measuring-specialisation).

  documents.py  calibration / held-out text -> packed numpy batches
  probe.py      router logits of every layer from one forward pass
  select.py     greedy layer-by-layer expert selection, random-subset baseline
  prune.py      physical pruning: slice experts and router columns, per-layer counts
  evaluate.py   held-out loss and perplexity of a model on batches
  analyze.py    per-domain routing vectors and the specialisation measures, tables, plots
  reproduce.py  EMO vs standard MoE pruning curves on the bundled corpus
  commands.py   the `emo-jax select | prune | eval | analyze | reproduce` entry points
                (models are loaded and saved by emo_jax.artifact)
"""


class ModularError(ValueError):
    """Bad input to selection, pruning, evaluation or analysis: one line naming the fix."""
