"""Downstream tasks: heads, metrics and prediction files (VQA, GQA, NLVR2, ...)."""
