"""The settings of one speed measurement (:class:`SpeedConfig`) and their checks.

Standard library only: the command line imports it at start-up to build ``attnsteer eval speed``'s
flags. Every field has the name of a flag of that command (``--batch_size``, ``--prompt_len``, ...;
the dashed spellings are aliases), and every error names the flag, the value and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UsageError

# what --backends accepts: attnsteer.apply's backends, and the names of earlier releases
BACKEND_CHOICES = ("auto", "flash", "chunked", "triton", "reference", "fused-pytorch", "fused-chunked", "fused-triton")
# --dtype spellings -> torch dtype names ("auto": bfloat16 on CUDA, float32 on CPU)
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "auto": "auto",
}
MEMORY_MODES = ("in-process", "fresh-process")
DEFAULT_OUTPUT = "evals/speed"


class SpeedError(UsageError):
    """A speed measurement cannot run as configured (a bad setting, a recipe that does not fit
    the model, ...): the command line prints it as one paragraph and exits with code 2."""


@dataclass
class SpeedConfig:
    """Settings of one speed measurement (``attnsteer eval speed``; pass to :func:`attnsteer.speed.measure`).

    Fields are checked when the config is made (and by :func:`dataclasses.replace`); a bad value
    raises :class:`SpeedError` naming the field (as its ``--flag``), the value and the fix.

    Attributes:
        model: what to build when :func:`~attnsteer.speed.measure` gets no model: ``smollm2`` (the
            embedded SmolLM2-135M-Instruct, real weights), a built-in config name (``llama-2-7b``,
            ``llava-1.5-7b``, ``llama-tiny``), a local ``config.json`` or model folder, or a hub id.
            With a loaded model: the name written in the results (default: the model's own).
        random_weights: build the model from its config with random weights (no weight download).
        batch_size: prompts per forward (>= 1).
        prompt_len: prompt tokens, one length or several (one result set per length; each >= 2);
            None: the built-in config's length (640 = 576 + 64 for ``llava-1.5-7b``), else 512.
        memory: ``in-process`` (peak memory in the timing process) or ``fresh-process`` (also each
            configuration's peak in its own fresh process; Linux; needs ``model``, not a loaded one).
        new_tokens: greedy decode steps after the prefill (>= 0).
        image_tokens: image-placeholder tokens at the start of the prompt (>= 0; None: 576 for
            ``llava-1.5-7b``, the config's ``image_seq_length`` for a VLM config, else 0).
        dtype: a key of :data:`DTYPES`; None: bfloat16 on CUDA, float32 on CPU.
        device: ``cuda``, ``cuda:N`` or ``cpu``; None: cuda when available.
        override: ``KEY=VALUE`` settings of the (text) config, e.g. ``["num_hidden_layers=4"]``.
        backends: backends each recipe runs with, from :data:`BACKEND_CHOICES`: comma-separated
            text or a list (stored as comma-separated text).
        repeats: timed (baseline, steered) pairs per recipe (>= 1).
        warmup: untimed runs per configuration first (>= 0).
        output_path: folder for the CSV / JSON / Markdown / PNG results.
        label: name of the result files (default: from the settings).
        seed: seed of the random prompt ids and weights.
        threads: torch CPU threads (>= 1; None: torch's default).
        no_plot: skip the PNG chart.
    """

    model: str | None = None
    random_weights: bool = False
    batch_size: int = 1
    prompt_len: int | Sequence[int] | None = None
    memory: str = "in-process"
    new_tokens: int = 128
    image_tokens: int | None = None
    dtype: str | None = None
    device: str | None = None
    override: list[str] = field(default_factory=list)
    backends: str | Sequence[str] = "auto,reference"
    repeats: int = 3
    warmup: int = 1
    output_path: str = DEFAULT_OUTPUT
    label: str | None = None
    seed: int = 0
    threads: int | None = None
    no_plot: bool = False

    def __post_init__(self) -> None:
        _check_ints(self)
        self.prompt_len = _lengths(self.prompt_len)
        self.backends = ",".join(_backend_list(self.backends))
        self.override = _overrides(self.override)
        if self.memory not in MEMORY_MODES:
            raise SpeedError(f"--memory {self.memory!r}: not a memory mode. Fix: use one of {', '.join(MEMORY_MODES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SpeedError(f"--dtype {self.dtype!r}: not a dtype. Fix: use one of {', '.join(sorted(DTYPES))}")
        for name in ("model", "device", "label"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SpeedError(f"--{name} {value!r}: expected a non-empty text. Fix: pass a name, or leave it unset")
        if not isinstance(self.output_path, str) or not self.output_path.strip():
            raise SpeedError(f"--output_path {self.output_path!r}: expected a folder path. Fix: pass a folder")

    @property
    def backend_list(self) -> list[str]:
        """The ``backends`` entries, in order, without repeats."""
        return _backend_list(self.backends)

    def replace(self, **changes) -> SpeedConfig:
        """A copy with ``changes`` (checked like a new config)."""
        return dataclasses.replace(self, **changes)


# ---- checks ----------------------------------------------------------------------------------------
_MINIMUM = {"batch_size": 1, "new_tokens": 0, "image_tokens": 0, "repeats": 1, "warmup": 0, "threads": 1}
_OPTIONAL = ("image_tokens", "threads")


def _check_ints(config: SpeedConfig) -> None:
    for name, minimum in _MINIMUM.items():
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else "an integer >= 0"
            raise SpeedError(f"--{name} {value!r}: expected {what}. Fix: pass {what}, e.g. --{name} {max(minimum, 1)}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise SpeedError(f"--seed {config.seed!r}: expected an integer. Fix: pass e.g. --seed 0")


def _lengths(value) -> list[int] | None:
    """None, one length or several -> a list without repeats; each an integer >= 2."""
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    shown = ",".join(map(str, values)) if values else repr(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise SpeedError(f"--prompt_len {shown}: expected prompt lengths like 512 or [512, 2048]. Fix: pass integers")
    if min(values) < 2:
        raise SpeedError(f"--prompt_len {shown}: every length must be >= 2. Fix: pass longer prompts, e.g. 512")
    return list(dict.fromkeys(values))


def _backend_list(value) -> list[str]:
    entries = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    shown = value if isinstance(value, str) else ",".join(map(str, entries or []))
    names = [str(b).strip() for b in entries or [] if str(b).strip()]
    bad = [b for b in names if b not in BACKEND_CHOICES]
    if bad or not names:
        raise SpeedError(
            f"--backends {shown!r}: allowed entries are {', '.join(BACKEND_CHOICES)}. Fix: pass a comma-separated "
            "list of them, e.g. auto,reference"
        )
    return list(dict.fromkeys(names))


def _overrides(value) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    for item in items:
        key, sep, _ = str(item).partition("=")
        if not sep or not key.strip():
            raise SpeedError(f"--override {item!r}: expected KEY=VALUE. Fix: e.g. --override num_hidden_layers=4")
    return [str(item) for item in items]
