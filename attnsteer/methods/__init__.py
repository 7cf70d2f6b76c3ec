"""Steering methods, one module each. Importing this package registers the implemented ones."""

from . import act, agla, hgai, pai, seka, softplus, spin, vaf, var, vhr  # noqa: F401  (registration side effects)
from .base import METHODS, PLANNED_METHODS, Method, Param

__all__ = ["METHODS", "PLANNED_METHODS", "Method", "Param"]
