"""Evaluators: shared infrastructure (`common`) and the task evaluators built on it."""
