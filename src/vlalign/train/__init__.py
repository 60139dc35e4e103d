"""Staged training: the run/stage plan, the feature cache, stage data and the training loop."""
