"""Version guard: attnsteer targets transformers 5.x (AttentionInterface + AttentionMaskInterface)."""

from __future__ import annotations

from importlib import metadata

# Lowest and first-unsupported transformers versions. Both ends are tested in CI or by hand
# (see README "Tested versions").
TRANSFORMERS_MIN = "5.17.0"
TRANSFORMERS_MAX_EXCLUSIVE = "6.0.0"
TORCH_MIN = "2.6.0"


def _parse(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def check_versions() -> None:
    """Raise ``ImportError`` naming the installed and supported versions when they do not fit."""
    try:
        tf_version = metadata.version("transformers")
    except metadata.PackageNotFoundError as exc:  # pragma: no cover - dependency is declared
        raise ImportError("attnsteer needs transformers: pip install 'transformers>=5.17,<6'") from exc
    if not (_parse(TRANSFORMERS_MIN) <= _parse(tf_version) < _parse(TRANSFORMERS_MAX_EXCLUSIVE)):
        raise ImportError(
            f"attnsteer supports transformers >={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX_EXCLUSIVE}; "
            f"found transformers=={tf_version}. Fix: pip install 'transformers>={TRANSFORMERS_MIN},"
            f"<{TRANSFORMERS_MAX_EXCLUSIVE}'"
        )
    torch_version = metadata.version("torch")
    if _parse(torch_version.split("+")[0]) < _parse(TORCH_MIN):
        raise ImportError(
            f"attnsteer needs torch>={TORCH_MIN}; found torch=={torch_version}. "
            f"Fix: pip install 'torch>={TORCH_MIN}'"
        )
