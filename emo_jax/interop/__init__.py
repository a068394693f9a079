"""Hugging Face checkpoint interop: OLMoE (`OlmoeForCausalLM`) and EMO (`EmoForCausalLM`) layouts.

Loading any model (a Hugging Face folder included) goes through `emo_jax.artifact.load`;
this package holds the layouts, the tensor maps and the safetensors reader and writer.
Pure numpy + JAX: reading and writing safetensors needs neither torch nor
transformers (those are only in the `interop` extra, for the parity tests).
"""

from emo_jax.interop.convert import detect_layout, export_hf  # noqa: F401
from emo_jax.interop.hf_common import InteropError  # noqa: F401
