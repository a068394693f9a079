"""Data: multi-domain corpus (TFDS), offline tokenizer, document packing, grain pipeline.

Heavy imports (tensorflow_datasets, grain) happen in the submodules, not here.
"""
