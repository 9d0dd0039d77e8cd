"""The training loop (plan -> forward/backward -> optimizer steps -> hooks) and its checkpoints."""
