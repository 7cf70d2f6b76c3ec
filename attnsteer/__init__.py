"""attnsteer: training-free attention interventions for Hugging Face models, exact and fused.

import attnsteer
with attnsteer.apply(model, "act-default") as handle:
    out = model.generate(**inputs)
print(handle.stats())
"""

from .compat import check_versions

check_versions()

from ._version import __version__  # noqa: E402
from .api import SteeringHandle, apply  # noqa: E402
from .compat import CompatibilityError  # noqa: E402
from .errors import (  # noqa: E402
    AttnsteerError,
    AttnsteerWarning,
    RecipeError,
    SilentSiteWarning,
    SteeringError,
    UnsupportedModelError,
)
from .plan import Plan, plan  # noqa: E402
from .recipe import Intervention, Recipe, builtin_names, load_recipe  # noqa: E402

__all__ = [
    "apply",
    "plan",
    "Plan",
    "SteeringHandle",
    "Recipe",
    "Intervention",
    "load_recipe",
    "builtin_names",
    "AttnsteerError",
    "AttnsteerWarning",
    "CompatibilityError",
    "RecipeError",
    "SilentSiteWarning",
    "SteeringError",
    "UnsupportedModelError",
    "__version__",
]
