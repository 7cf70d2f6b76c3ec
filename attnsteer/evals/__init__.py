"""Evaluation harness: POPE, CHAIR, MMLU (lm-eval) and speed.

Nothing here is imported by ``import attnsteer``; each submodule loads its own dependencies.
"""
