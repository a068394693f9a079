"""Test setup: 8 emulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the tests and the training subprocesses they
# start: many tests compile the same train step, and a rerun compiles almost nothing.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# On CPU the tests compile hundreds of tiny programs whose run time is negligible next to
# their compile time. XLA's backend optimisation level 0 (jax's "most optimisations off")
# takes about a third off the default run (BUILD_NOTES.md, "Eleventh session"). It changes
# float rounding only, within every test's tolerance; the training subprocesses the tests
# start inherit it. A test that pins a bitwise property of the optimised program takes the
# `full_optimization` fixture below. The suite as training compiles it:
#   JAX_DISABLE_MOST_OPTIMIZATIONS=0 bash launch/test.sh
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
MOST_OPTIMIZATIONS_OFF = "jax_disable_most_optimizations"  # the jax flag the variable sets


def pytest_report_header(config):
    level = "most optimisations off" if jax.config.values[MOST_OPTIMIZATIONS_OFF] else "full"
    return (f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}, "
            f"XLA optimisation: {level}")


@pytest.fixture
def full_optimization():
    """Compiles everything in the test at XLA's full optimisation, as training does.
    In-memory caches are cleared on both sides, so no program compiled at the other
    level is reused (the persistent cache keys on the level)."""
    previous = jax.config.values[MOST_OPTIMIZATIONS_OFF]
    jax.clear_caches()
    jax.config.update(MOST_OPTIMIZATIONS_OFF, False)
    try:
        yield
    finally:
        jax.config.update(MOST_OPTIMIZATIONS_OFF, previous)
        jax.clear_caches()
