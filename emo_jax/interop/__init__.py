"""Hugging Face checkpoint interop: OLMoE (`OlmoeForCausalLM`) and EMO (`EmoForCausalLM`) layouts.

Pure numpy + JAX: reading and writing safetensors needs neither torch nor
transformers (those are only in the `interop` extra, for the parity tests).
"""

from emo_jax.interop.convert import detect_layout, export_hf, import_hf  # noqa: F401
from emo_jax.interop.hf_common import InteropError  # noqa: F401
