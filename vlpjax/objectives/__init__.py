"""Pretraining objectives: masking, the loss families, and the per-design mix.

The train step uses `vlpjax.objectives.pretraining` (make_inputs,
compute_losses, tasks_for, sample_task) and `masking.step_rng`.
"""
