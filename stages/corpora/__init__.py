"""Offline corpora generated from a seed in seconds: the paper's toy tasks and synthetic languages."""
from forgetting.stages.corpora import synthetic, toy_tasks

__all__ = ["synthetic", "toy_tasks"]
