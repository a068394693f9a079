"""Linen modules: norms, RoPE, attention, the EMO MoE block, the decoder."""

from emo_jax.model.moe_block import MoEBlock  # noqa: F401
from emo_jax.model.transformer import Block, EmoTransformer, build_model  # noqa: F401
