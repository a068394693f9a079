"""MoE dispatch / grouped matmul / combine backends behind one interface."""

from emo_jax.kernels.reference import combine, dispatch, grouped_swiglu, moe_ffn  # noqa: F401
