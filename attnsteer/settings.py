"""attnsteer's environment overrides, read in this one place.

These variables override defaults for a whole process, e.g. in a benchmark or a serving engine
(the backend itself is ``attnsteer.apply(..., backend=...)``'s argument):

==================================  ==========================================================
``ATTNSTEER_TRITON``                ``0``/``off``: never use the Triton kernels; ``1``/``on``: also
                                    on CPU tensors under ``TRITON_INTERPRET=1`` (interpreter
                                    tests); unset: on CUDA tensors when triton imports
``ATTNSTEER_TRITON_STRICT``         ``1``: a kernel that fails to compile, launch or its self-check
                                    raises instead of sending its (rule kind, dtype, head dim) to
                                    the chunked path for the process with a warning (the Triton
                                    kernels, and vLLM's FlexAttention path)
``ATTNSTEER_TRITON_SELFCHECK``      ``0``: skip the kernels' self-check (a small synthetic call
                                    compared with the chunked path before each (rule kind, dtype,
                                    head dim) is first served in a process; the Triton kernels and
                                    vLLM's FlexAttention path)
``ATTNSTEER_TRITON_BLOCK_M``,       prefill kernels' tile sizes, warps and pipeline stages
``_BLOCK_N``, ``_WARPS``,
``_STAGES``
``ATTNSTEER_TRITON_DECODE_BLOCK_N``, decode kernels' key tile, warps and most key splits
``_DECODE_WARPS``, ``_MAX_SPLITS``
``ATTNSTEER_CACHE``                 folder for de-quantised embedded models (default
                                    ``~/.cache/attnsteer``)
``ATTNSTEER_RECIPE``                the recipe of a vLLM engine started without
                                    ``additional_config``
``ATTNSTEER_METHODS``               comma-separated modules of your own methods, imported (so
                                    registered) in every process of a vLLM engine
==================================  ==========================================================

:func:`current` reads them (a handle reads its routing settings once, at ``apply``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

RECIPE_ENV = "ATTNSTEER_RECIPE"


def _flag(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def _int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r}: expected an integer. Fix: unset it or give a whole number") from None


@dataclass(frozen=True)
class KernelTuning:
    """Overrides of the Triton kernels' launch settings (None: the kernels' own choice)."""

    block_m: int | None = None
    block_n: int | None = None
    warps: int | None = None
    stages: int | None = None
    decode_block_n: int | None = None
    decode_warps: int | None = None
    max_splits: int | None = None


@dataclass(frozen=True)
class Settings:
    triton: str = "auto"  # auto | off | interpret
    triton_strict: bool = False
    triton_selfcheck: bool = True
    kernels: KernelTuning = field(default_factory=KernelTuning)
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/attnsteer").expanduser())
    recipe: str | None = None
    method_modules: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        mode = _flag("ATTNSTEER_TRITON")
        triton = "off" if mode in _FALSE else ("interpret" if mode in _TRUE else "auto")
        cache = os.environ.get("ATTNSTEER_CACHE")
        return cls(
            triton=triton,
            triton_strict=_flag("ATTNSTEER_TRITON_STRICT") in _TRUE,
            triton_selfcheck=_flag("ATTNSTEER_TRITON_SELFCHECK") not in _FALSE,
            kernels=kernel_tuning(),
            cache_dir=Path(cache).expanduser() if cache else Path("~/.cache/attnsteer").expanduser(),
            recipe=os.environ.get(RECIPE_ENV) or None,
            method_modules=tuple(m.strip() for m in os.environ.get("ATTNSTEER_METHODS", "").split(",") if m.strip()),
        )


def import_method_modules() -> None:
    """Import the modules ``ATTNSTEER_METHODS`` names (each registers its methods); an import that
    fails raises naming the variable and the module."""
    import importlib

    for name in current().method_modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(
                f"$ATTNSTEER_METHODS names {name!r}, which cannot be imported ({exc}). Fix: put the module on "
                "PYTHONPATH for every process of the engine, or drop it from ATTNSTEER_METHODS"
            ) from exc


def kernel_tuning() -> KernelTuning:
    """The kernel launch overrides alone (what each Triton launch reads: not the whole Settings)."""
    return KernelTuning(
        block_m=_int("ATTNSTEER_TRITON_BLOCK_M"),
        block_n=_int("ATTNSTEER_TRITON_BLOCK_N"),
        warps=_int("ATTNSTEER_TRITON_WARPS"),
        stages=_int("ATTNSTEER_TRITON_STAGES"),
        decode_block_n=_int("ATTNSTEER_TRITON_DECODE_BLOCK_N"),
        decode_warps=_int("ATTNSTEER_TRITON_DECODE_WARPS"),
        max_splits=_int("ATTNSTEER_TRITON_MAX_SPLITS"),
    )


def current() -> Settings:
    """The settings the environment gives now."""
    return Settings.from_env()
