"""Config files, dotted overrides, validation messages and parameter counts."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

from emo_jax.config import Config, ConfigError, config_from_dict, load_config, parse_overrides
from emo_jax.param_count import count_params

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(*overrides):
    return load_config(TINY, list(overrides))


def test_configs_dir_is_not_empty():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "emo_1b14b", "olmoe_1b7b", "stdmoe_1b14b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name == path.stem
    m = cfg.model
    assert 0 < m.routed_top_k <= m.n_routed_experts
    assert cfg.data.seq_len <= m.max_seq_len
    assert cfg.data.global_batch_size % cfg.train.micro_batches == 0


def test_released_emo_config_matches_spec():
    cfg = load_config(ROOT / "configs" / "emo_1b14b.yaml")
    m, r = cfg.model, cfg.routing
    assert (m.n_layers, m.d_model, m.n_heads, m.head_dim) == (16, 2048, 16, 128)
    assert (m.n_experts, m.n_shared_experts, m.top_k, m.expert_hidden) == (128, 1, 8, 1024)
    assert (m.vocab_size, m.rope_theta, m.norm_eps, m.qk_norm, m.tie_embeddings) == (100352, 500000.0, 1e-6, False, False)
    assert (r.pool, r.pool_min, r.pool_max) == ("random", 8, 128)
    # The official convention: router segments from EOS, a new one starting at each EOS.
    assert (r.segments, r.eos_id) == ("eos", 100257)
    assert (cfg.loss.lb_weight, cfg.loss.router_z_weight, cfg.loss.output_z_weight) == (0.1, 0.001, 1e-5)
    o = cfg.optimizer
    assert (o.peak_lr, o.warmup_steps, o.final_lr_ratio, o.b1, o.b2, o.weight_decay, o.grad_clip) == \
        (4e-3, 2000, 0.1, 0.9, 0.95, 0.1, 1.0)
    std = load_config(ROOT / "configs" / "stdmoe_1b14b.yaml")
    assert std.routing.pool == "none" and std.model == m  # identical model, no pool
    assert dataclasses.replace(std.routing, pool="random") == r and std.loss == cfg.loss


def test_dotted_overrides():
    cfg = tiny("model.d_model=32", "model.qk_norm=true", "optimizer.peak_lr=1.0e-3",
               "routing.pool=fixed", "routing.pool_size=5", "loss.lb_weight=0", "name=exp1")
    assert cfg.model.d_model == 32 and isinstance(cfg.model.d_model, int)
    assert cfg.model.qk_norm is True
    assert cfg.optimizer.peak_lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.peak_lr, float)
    assert cfg.routing.pool == "fixed" and cfg.routing.pool_size == 5
    assert cfg.loss.lb_weight == 0.0 and isinstance(cfg.loss.lb_weight, float)  # int accepted for float
    assert cfg.name == "exp1"
    # untouched values come from the file, the rest from the dataclass defaults
    assert cfg.model.n_experts == 8 and cfg.model.vocab_size == 512
    assert cfg.model.norm_eps == 1e-6
    assert tiny("model.qk_norm=false").model.qk_norm is False
    # last override wins
    assert tiny("model.d_model=32", "model.d_model=48").model.d_model == 48
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def err(*overrides, path=TINY, one_line=True):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    if one_line:
        assert "\n" not in msg.strip(), msg  # config.py promises one-line errors
    return msg


def test_unknown_key_suggests_the_right_one():
    msg = err("model.d_modle=32")
    assert "model.d_modle" in msg and "d_model" in msg and "Did you mean" in msg
    msg = err("modle.d_model=32")
    assert "modle" in msg and "'model'" in msg
    msg = err("routing.pool_sizes=3")
    assert "pool_size" in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  n_expert: 4\n")
    msg = err(path=p)
    assert "model.n_expert" in msg and "n_experts" in msg


@pytest.mark.parametrize("override,words", [
    ("model.d_model=abc", ["model.d_model", "integer"]),
    ("model.d_model=3.5", ["model.d_model", "integer"]),
    ("model.qk_norm=1", ["model.qk_norm", "true or false"]),
    ("optimizer.peak_lr=fast", ["optimizer.peak_lr", "number"]),
    ("routing.pool=fixd", ["routing.pool", "fixed"]),
    ("model.d_model.x=3", ["model.d_model"]),
])
def test_wrong_type_names_the_key(override, words):
    msg = err(override)
    for w in words:
        assert w in msg, (w, msg)


def test_top_k_larger_than_experts():
    msg = err("model.top_k=9")
    assert "model.top_k" in msg
    assert "top_k" in err("model.top_k=1")  # no routed expert left (1 shared)
    tiny("model.top_k=8", "routing.pool_min=7")  # 7 routed + 1 shared: the maximum


@pytest.mark.parametrize("overrides,key", [
    (("routing.pool_min=2",), "pool_min"),  # below k_r = 3
    (("routing.pool_max=9",), "pool_max"),  # above n_experts = 8
    (("routing.pool_min=6", "routing.pool_max=5"), "pool_min"),
    (("routing.pool=fixed", "routing.pool_size=2"), "routing.pool_size"),
    (("routing.pool=fixed", "routing.pool_size=9"), "routing.pool_size"),
    (("routing.eval_pool=fixed", "routing.eval_pool_size=2"), "routing.eval_pool_size"),
])
def test_pool_range_errors(overrides, key):
    msg = err(*overrides)
    assert key in msg
    assert "k_r=3" in msg


def test_pool_range_edges_are_accepted():
    tiny("routing.pool_min=3", "routing.pool_max=3")
    tiny("routing.pool_min=3", "routing.pool_max=8")
    tiny("routing.pool=fixed", "routing.pool_size=3")


def test_pool_min_above_pool_max_says_so():
    msg = err("routing.pool_min=6", "routing.pool_max=5")
    assert "pool_min=6" in msg and "pool_max=5" in msg and "pool_min <= pool_max" in msg


def test_expert_axis_must_divide_experts():
    msg = err("mesh.expert=3")
    assert "mesh.expert=3" in msg and "n_experts=8" in msg
    assert tiny("mesh.expert=4").mesh.expert == 4


def test_batch_must_divide_into_micro_batches():
    msg = err("train.micro_batches=3")
    assert "train.micro_batches=3" in msg and "global_batch_size=8" in msg
    assert tiny("train.micro_batches=4").train.micro_batches == 4
    assert "micro_batches" in err("train.micro_batches=0")


def test_other_cross_field_errors():
    assert "data.seq_len" in err("data.seq_len=256")  # > max_seq_len 128
    assert "model.head_dim" in err("model.head_dim=15")
    assert "model.n_shared_experts" in err("model.n_shared_experts=8")
    assert "mesh" in err("mesh.data=-1", "mesh.fsdp=-1")
    assert "model.d_model" in err("model.d_model=0")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(ROOT / "configs" / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_malformed_overrides():
    msg = err("model.d_model")
    assert "model.d_model" in msg and "section.key=value" in msg
    msg = err("model.d_model=[1,")
    assert "model.d_model" in msg and "YAML" in msg
    with pytest.raises(ConfigError):
        config_from_dict({"model": 3})


def test_malformed_yaml_file_is_a_one_line_error_naming_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model:\n  d_model: [1,\n")
    msg = err(path=p, one_line=True)
    assert "broken.yaml" in msg and "line 3" in msg, msg


@pytest.mark.parametrize("override, expected", [
    ("train.log_every=0", "train.log_every=0 must be >= 1"),  # was a ZeroDivisionError in the loop
    ("train.eval_every=-1", "train.eval_every=-1 must be >= 0"),
    ("train.checkpoint_every=-5", "train.checkpoint_every=-5 must be >= 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be >= 1"),
    ("train.steps=0", "train.steps=0 must be >= 1"),
    ("train.eval_batches=0", "train.eval_batches=0 must be >= 1"),
    ("train.seed=-1", "train.seed=-1 must be >= 0"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("data.seed=-2", "data.seed=-2 must be >= 0"),
    ("optimizer.peak_lr=0", "optimizer.peak_lr=0.0 must be > 0"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps=-1 must be >= 0"),
    ("optimizer.final_lr_ratio=1.5", "optimizer.final_lr_ratio=1.5 must be in [0, 1]"),
    ("optimizer.b1=1", "optimizer.b1=1.0 must be in [0, 1)"),
    ("optimizer.b2=-0.1", "optimizer.b2=-0.1 must be in [0, 1)"),
    ("optimizer.eps=0", "optimizer.eps=0.0 must be > 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("optimizer.grad_clip=0", "optimizer.grad_clip=0.0 must be > 0"),
    ("loss.lb_weight=-1", "loss.lb_weight=-1.0 must be >= 0"),
    ("loss.router_z_weight=-1e-3", "loss.router_z_weight=-0.001 must be >= 0"),
    ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be > 0"),
    ("model.init_std=-0.02", "model.init_std=-0.02 must be > 0"),
    ("routing.eos_id=-1", "routing.eos_id=-1 must be >= 0"),
    ("optimizer.peak_lr=.nan", "optimizer.peak_lr=nan must be a finite number"),
    ("loss.lb_weight=.inf", "loss.lb_weight=inf must be a finite number"),
])
def test_every_numeric_field_is_range_checked_naming_the_key(override, expected):
    assert expected in err(override)


def test_range_table_names_real_fields():
    from emo_jax.config import _RANGES
    cfg = tiny()
    for key in _RANGES:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name) or key == "data.shuffle_rows", key


@pytest.mark.parametrize("text", ["3e-4", "3E-4", "3.e-4", "0.0003", "+3e-4"])
def test_scientific_notation_is_accepted_on_the_command_line(text):
    # YAML 1.1 reads `3e-4` (no dot) as a string; float fields accept it anyway.
    cfg = tiny(f"optimizer.peak_lr={text}")
    assert cfg.optimizer.peak_lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.peak_lr, float)


def test_scientific_notation_is_accepted_in_a_yaml_file(tmp_path):
    p = tmp_path / "sci.yaml"
    p.write_text("optimizer:\n  peak_lr: 3e-4\n  eps: 1e-8\nloss:\n  output_z_weight: 1e-5\n"
                 "model:\n  rope_theta: 5e5\nname: 1e-3\n")
    cfg = load_config(p)
    assert (cfg.optimizer.peak_lr, cfg.optimizer.eps, cfg.loss.output_z_weight, cfg.model.rope_theta) == \
        (3e-4, 1e-8, 1e-5, 5e5)
    assert cfg.name == "1e-3"  # a string field keeps its string
    assert "model.d_model" in err("model.d_model=1e3")  # integer fields do not take floats


# ------------------------------------------------------------------------ param counts


def expected_counts(cfg):
    """Independent parameter count from the architecture (docs/algorithm.md#architecture-of-the-released-models)."""
    m = cfg.model
    d, hd = m.d_model, m.n_heads * m.head_dim
    attn = 4 * d * hd + (2 * hd if m.qk_norm else 0)
    expert = 3 * d * m.expert_hidden
    router = d * m.n_routed_experts
    per_layer = attn + m.n_experts * expert + router + 2 * d
    embed = m.vocab_size * d * (1 if m.tie_embeddings else 2)
    total = m.n_layers * per_layer + d + embed
    active = total - m.n_layers * (m.n_experts - m.top_k) * expert
    return total, embed, active


@pytest.mark.parametrize("name", ["emo_1b14b", "olmoe_1b7b", "stdmoe_1b14b", "tiny"])
def test_param_count_matches_architecture(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    counts = count_params(cfg)
    total, embed, active = expected_counts(cfg)
    assert counts.total == total
    assert counts.embedding == embed
    assert counts.active == active


def test_param_count_emo_headline_numbers():
    c = count_params(load_config(ROOT / "configs" / "emo_1b14b.yaml"))
    assert math.isclose(c.total, 13.6e9, rel_tol=0.01), c.total
    assert 1.07e9 <= c.active_non_embedding <= 1.08e9, c.active_non_embedding


def test_param_count_olmoe_headline_numbers():
    c = count_params(load_config(ROOT / "configs" / "olmoe_1b7b.yaml"))
    assert math.isclose(c.total, 6.9e9, rel_tol=0.03), c.total
    assert math.isclose(c.active, 1.3e9, rel_tol=0.03), c.active
