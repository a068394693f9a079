"""Optimizer, train state and the train step (the loop and checkpoints come later)."""

from emo_jax.train.objective import LossParts, objective  # noqa: F401
from emo_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask  # noqa: F401
from emo_jax.train.step import TrainState, init_params, init_train_state, make_train_step  # noqa: F401
