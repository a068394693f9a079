"""Accelerator check: every GPU kernel against its reference, then the kernel, MoE-layer,
attention and training-step benchmarks at EMO's layer shape, with MFU, in one bounded run
that writes one results file (docs/accelerator_check.md).

  bash launch/accelerator_check.sh --out DIR          (a GPU machine, under 8 minutes)
  python -m emo_jax.accelcheck --tiny --interpret     (CPU: every section at tiny shapes,
                                                       the Pallas kernels interpreted)

Modules: `shapes` (the EMO and tiny problem sizes), `flops` (model-FLOP formulas and
peak figures), `report` (the results document and its rendering), `timing` (timed
calls and MFU records), `problems` (random inputs), `env`, `correctness`, `bench`
(kernels, MoE layer, attention), `train_step` (the sections), `runner` (the
orchestrator: one subprocess per section, a time budget, the exit code).

This package's `__init__`, `shapes`, `flops`, `report` and `runner` import no jax: the
orchestrator stays light, and a hung section is killed without taking the others with it.
"""
