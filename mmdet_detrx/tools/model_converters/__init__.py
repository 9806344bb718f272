"""Checkpoint conversion tools (``convert``: other codebases' checkpoints to ours)."""
