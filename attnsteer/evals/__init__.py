"""Evaluation harness: POPE, CHAIR and MMLU (lm-eval); the speed benchmark is attnsteer.speed.

Nothing here is imported by ``import attnsteer``; each submodule loads its own dependencies.
"""
