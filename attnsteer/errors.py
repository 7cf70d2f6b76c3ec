"""Exceptions and warnings raised by attnsteer.

Every error names the offending field, the value it got, what is allowed and how to fix it.
"""


class AttnsteerError(Exception):
    """Base class of every attnsteer error."""


class RecipeError(AttnsteerError, ValueError):
    """A recipe (YAML, dict or object) is malformed or does not fit the model it is applied to."""


class UnsupportedModelError(AttnsteerError, ValueError):
    """The model's family, attention implementation or layout is not supported."""


class SteeringError(AttnsteerError, RuntimeError):
    """Steering cannot proceed at run time (already steered, missing prompt state, ...)."""


class UsageError(AttnsteerError, ValueError):
    """A bad argument or option of a command or an evaluation (``--model``, ``--recipe``, a data
    path, ...): the command line prints it as one paragraph and exits with code 2."""


class EvalError(UsageError):
    """An evaluation cannot run as configured (missing data, a recipe that does not fit, ...)."""


class AttnsteerWarning(UserWarning):
    """Something will not change the model's behaviour the way the user probably expects."""


class SilentSiteWarning(AttnsteerWarning):
    """Sites of a recipe ran but never changed a row (warned when the handle is removed): the
    recipe changed nothing there. The test suite treats it as an error unless a test expects it."""
