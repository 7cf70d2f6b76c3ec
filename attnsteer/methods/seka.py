"""SEKA -- spectral key editing toward marked spans (docs/methods.md#seka).

Li et al., "Spectral Attention Steering for Prompt Highlighting", ICLR 2026 (arXiv 2603.01281).

Key step (prefill, before RoPE): for the keys of the marked tokens (a ``handle.focus(mask)`` span,
or the image tokens of a vision-language model), per kv head ``h``::

    k <- k + g+ P+_h k                       (no negative projection, or g- = 0)
    k <- k + (g+ P+_h k + g- P-_h k) / 2     (with one)

``P+`` / ``P-`` are projections built offline per model, layer and kv head from the keys of answer
spans (``attnsteer calibrate seka``): :class:`Projections`, a safetensors file the recipe carries
(``params.projections``: its path beside the recipe and its sha256). The edited keys enter the KV
cache, so every attention kernel runs unchanged (a :class:`~attnsteer.methods.rules.KeyRule`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RecipeError, SteeringError
from .base import Method, param, register
from .rules import KeyRule

FORMAT = "attnsteer.seka.projections"
FORMAT_VERSION = 1
META_KEY = "attnsteer"  # the one metadata entry (canonical JSON: the file's bytes are reproducible)
BUILD = (
    "build projections for this model with `attnsteer calibrate seka --model MODEL --data QA.jsonl --out "
    "recipe.yaml` (docs/calibrate.md#calibrate-seka), which writes the file and a recipe naming it"
)
# what a projection file must agree on with the model it steers (metadata key -> ResolvedArch fact)
MODEL_FACTS = ("model_type", "num_layers", "num_kv_heads", "head_dim", "hidden_size")


@dataclass
class Projections:
    """SEKA's projections for one model.

    pos:  layer -> float32 (H_kv, D, D), P+ per kv head (zeros: a head without projection).
    neg:  layer -> float32 (H_kv, D, D), P- per kv head, or None (no negative projection).
    meta: JSON-friendly facts: ``model_type``, ``num_layers``, ``num_kv_heads``, ``head_dim``,
          ``hidden_size``, ``layers``, ``negative``, ``projected`` ({layer: [kv heads]}) and how
          the file was built (``top_pct``, ``min_diff``, ``build``).
    """

    pos: dict[int, torch.Tensor]
    neg: dict[int, torch.Tensor] | None
    meta: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The safetensors file: tensors ``layers.{l}.pos`` / ``layers.{l}.neg`` and one metadata
        entry, so equal projections give equal bytes."""
        from safetensors.torch import save

        tensors = {f"layers.{l}.pos": t.float().contiguous() for l, t in self.pos.items()}
        tensors.update({f"layers.{l}.neg": t.float().contiguous() for l, t in (self.neg or {}).items()})
        meta = {**self.meta, "format": FORMAT, "version": FORMAT_VERSION}
        meta.update(layers=sorted(self.pos), negative=self.neg is not None)
        return save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Projections:
        """Read a file written by :meth:`save` (checked as :func:`read_header` does)."""
        from safetensors.torch import load_file

        meta, _ = read_header(path)
        tensors = load_file(str(path))
        pos = {l: tensors[f"layers.{l}.pos"] for l in meta["layers"]}
        neg = {l: tensors[f"layers.{l}.neg"] for l in meta["layers"]} if meta["negative"] else None
        return cls(pos, neg, meta)


def _bad_file(path, why: str) -> RecipeError:
    return RecipeError(f"the SEKA projection file {str(path)!r} {why}. Fix: {BUILD}")


@functools.lru_cache(maxsize=16)
def _header(path: str, stamp: tuple) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            shapes = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as exc:  # truncated, corrupted, not safetensors
        raise _bad_file(path, f"is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        meta = json.loads(raw)
        known = meta["format"] == FORMAT and isinstance(meta["layers"], list)
    except (TypeError, ValueError, KeyError):
        known = False
    if not known:
        raise _bad_file(path, f"holds no attnsteer SEKA metadata (format {FORMAT!r})")
    missing = [k for k in (*MODEL_FACTS, "negative") if k not in meta]
    if missing:
        raise _bad_file(path, f"lacks the metadata {missing}")
    if meta.get("version") != FORMAT_VERSION:
        raise _bad_file(path, f"has format version {meta.get('version')!r}; this attnsteer reads {FORMAT_VERSION}")
    return meta, shapes


def read_header(path: str | Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (shape, dtype)}) of a projection file, reading the header only;
    checks that every recorded layer has its tensors of shape (H_kv, D, D) in float32. Raises
    RecipeError naming the file and the fix."""
    stat = Path(path).stat()
    meta, shapes = _header(str(path), (stat.st_size, stat.st_mtime_ns))
    want = ((meta["num_kv_heads"], meta["head_dim"], meta["head_dim"]), "F32")
    names = [f"layers.{l}.{kind}" for l in meta["layers"] for kind in ("pos", "neg")[: 1 + bool(meta["negative"])]]
    wrong = [f"{n} {shapes.get(n, 'missing')}" for n in names if shapes.get(n) != want] + sorted(
        set(shapes) - set(names)
    )
    if wrong:
        raise _bad_file(path, f"does not match its own metadata (expected {want} per layer): {', '.join(wrong[:4])}")
    return meta, shapes


def _model_facts(arch) -> dict:
    return {
        "model_type": arch.spec.model_type,
        "num_layers": arch.num_layers,
        "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_size": getattr(arch.text_config, "hidden_size", None),
    }


@dataclass(frozen=True)
class SEKAParams:
    """SEKA's parameters (docs/methods.md#seka)."""

    g_pos: float = param(0.8, "gain on the positive projection P+ (released default 0.8)", low=0.0, high=10.0)
    g_neg: float = param(
        0.2, "gain on the negative projection P- (released default 0.2; 0: P+ alone)", low=0.0, high=10.0
    )
    projections: object = param(
        None,
        "the projection file (safetensors) built for the model by `attnsteer calibrate seka`",
        allowed_text="{path: FILE.safetensors, sha256: HEX}, the file beside the recipe",
    )


def marked_tokens(image: torch.Tensor, positions: torch.Tensor, rows: int) -> torch.Tensor:
    """image bool (R, P) marked prompt positions, positions long (B|1, T) absolute -> bool (rows, T)
    (generated positions, at >= P, are never marked)."""
    if image.shape[0] != rows:
        raise SteeringError(
            f"SEKA: the forward has {rows} batch rows and the prompt's marks {image.shape[0]}. Fix: give "
            "handle.focus(mask) a mask of the prompt batch's shape"
        )
    length = image.shape[-1]
    pos = positions.to(image.device).expand(rows, -1)
    return image.gather(1, pos.clamp(max=length - 1)) & (pos < length)


class SpectralKeyEdit(KeyRule):
    """``k <- k + M_h k`` on the keys of marked tokens, with ``M`` float32 (H_kv, D, D) the layer's
    gains times projections; computed in float32, cast back; other keys are returned as they came."""

    def __init__(self, method, operator: torch.Tensor):
        super().__init__(method)
        self.operator = operator
        self.kv_heads = (operator.abs().sum((1, 2)) > 0).nonzero().flatten().tolist()
        self._placed: dict = {}  # device -> operator there (a constant, not per-prompt state)

    def edit(self, keys, positions, prompt):
        if prompt.roles is None:
            return keys, 0
        marked = marked_tokens(prompt.roles.image, positions, keys.shape[0]).to(keys.device)[:, :, None, None]
        op = self._placed.get(keys.device)
        if op is None:
            op = self._placed[keys.device] = self.operator.to(keys.device)
        k = keys.float()
        moved = k + torch.einsum("hed,bthd->bthe", op, k)
        return torch.where(marked, moved.to(keys.dtype), keys), marked.sum() * len(self.kv_heads)


@register
class SEKA(Method):
    name = "seka"
    docs = "docs/methods.md#seka"
    citation = "Li et al., ICLR 2026, arXiv 2603.01281"
    default_layers = "-10:"
    needs_image = True
    whole_prompt = "it edits the marked tokens' keys at prefill; the chunks after a prompt's first would stay unedited"
    carried_files = {"projections": BUILD}  # recipe-level: a file beside the recipe, checked by sha256
    Params = SEKAParams

    @classmethod
    def is_identity_params(cls, params) -> bool:
        if params["g_pos"] != 0.0:
            return False
        file = params["projections"]
        return params["g_neg"] == 0.0 or (file is not None and not read_header(file.resolved)[0]["negative"])

    @classmethod
    def check_model(cls, params, arch, where) -> None:
        if params["projections"] is None:  # a recipe may load without it; it cannot steer
            raise RecipeError(
                f"{where}.params.projections: not set; SEKA edits keys with projections built offline for the "
                f"model. Fix: {BUILD}"
            )
        file = params["projections"].resolved
        meta, _ = read_header(file)
        facts = _model_facts(arch)
        wrong = [f"{k} {meta.get(k)!r} (this model: {v!r})" for k, v in facts.items() if meta.get(k) != v]
        if wrong:
            raise RecipeError(
                f"{where}.params.projections: the file {str(file)!r} was built for another model: {', '.join(wrong)}. "
                f"Fix: use the recipe made for this model, or {BUILD}"
            )

    def build_rules(self) -> list:
        return [SpectralKeyEdit(self, self._operator())]

    def _operator(self) -> torch.Tensor:
        """float32 (H_kv, D, D): ``g+ P+`` or ``(g+ P+ + g- P-) / 2`` of this layer (zero on kv heads
        outside a ``heads`` subset)."""
        from safetensors import safe_open

        file = self.p.projections.resolved
        meta, _ = read_header(file)
        if self.layer not in meta["layers"]:
            raise RecipeError(
                f"seka: the recipe steers layer {self.layer}, and the projection file {str(file)!r} holds layers "
                f"{meta['layers']}. Fix: set the intervention's layers to those (or a subset), or {BUILD} with "
                f"--layers including {self.layer}"
            )
        with safe_open(str(file), "pt") as f:
            op = self.p.g_pos * f.get_tensor(f"layers.{self.layer}.pos").float()
            if meta["negative"] and self.p.g_neg != 0.0:
                op = (op + self.p.g_neg * f.get_tensor(f"layers.{self.layer}.neg").float()) / 2
        if self.heads is not None:
            groups = self.heads.view(op.shape[0], -1)
            if bool((groups.any(1) != groups.all(1)).any()):
                raise RecipeError(
                    f"seka: layer {self.layer}'s heads select part of a group of query heads sharing a kv head; "
                    f"SEKA edits keys, so it steers whole groups of {groups.shape[1]}. Fix: select every query head "
                    "of a group, or heads: all"
                )
            op = op * groups.all(1).view(-1, 1, 1)
        return op

    def report(self, prompt) -> dict | None:
        """``{"kv_heads": [kv heads edited in this layer], "marked": [marked tokens per batch row]}``."""
        if prompt.roles is None:
            return None
        return {"kv_heads": self.rules[0].kv_heads, "marked": prompt.roles.image.sum(-1).tolist()}
