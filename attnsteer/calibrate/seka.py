"""``attnsteer calibrate seka``: SEKA's projections from a small question-answering set.

SEKA (docs/methods.md#seka) edits the keys of marked tokens with per-head projections built offline.
For every example (a context, a question it answers, an irrelevant question, the answer: a span of
the context) the model reads the context in three prompts::

    H    "Context: {context}"
    H+   "Question: {question}\\nContext: {context}"
    H-   "Question: {irrelevant_question}\\nContext: {context}"

(``chat``: each as the user message of the tokenizer's chat template). The keys of the answer's
tokens (every token overlapping the answer's characters in the context), at the output of each
layer's key projection (``ArchSpec.key_projection``, before RoPE), are stacked per layer and kv head
into ``H``, ``H+``, ``H-`` (n, D). Then, in float64::

    Omega+ = H^T H+ / n,  Omega- = H^T H- / n          (D, D)
    P+ = U+_k U+_k^T   over the leading k left singular vectors of Omega+
    P- = U-_r U-_r^T   over the left singular vectors of Omega- after its leading k-
    k = 1 + #{i : (s_1 + ... + s_i) / sum(s) < top_pct}

and a head whose keys barely move between the two questions, ``||H+ - H-||_F / n < min_diff``, gets
no projection (zeros). :func:`build_projections` returns them (:class:`Projections`); the command
writes the file beside the recipe and the recipe naming it by path and sha256. Same input, same
bytes.

In Python: :func:`build_projections` and :func:`seka_recipe` on a loaded model, or
``calibrate(SekaCalibrationConfig(data=..., out=...), loaded=(tokenizer, model))`` for what
``attnsteer calibrate seka`` (:mod:`attnsteer.cli.calibrate_seka`) does: it returns a
:class:`SekaCalibrationResult`; the command prints :func:`format_table` and the paths.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import archs
from ..errors import RecipeError, UsageError
from ..methods.seka import Projections
from ..selectors import validate_layers
from ._common import LineStream, Progress, check_count, check_number

if TYPE_CHECKING:
    from ..recipe import Recipe

DATA_FORMAT = (
    'a JSONL file of {"context": TEXT, "question": TEXT, "answer": TEXT, "irrelevant_question": TEXT} lines '
    '("answer": a span of the context; "irrelevant_question" optional: default the next example\'s question)'
)
FORMS = ("H", "H+", "H-")


@dataclass(frozen=True)
class QAExample:
    """One calibration example; ``where`` says where it came from (for error messages)."""

    context: str
    question: str
    answer: str
    irrelevant_question: str | None = None
    where: str = "example"


def read_examples(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """The examples of a JSONL file (:data:`DATA_FORMAT`); a bad line raises UsageError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--data {str(path)!r}: no such file. Fix: pass {DATA_FORMAT}")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not JSON ({exc}). Fix: one object per line, {DATA_FORMAT}") from None
        fields = ("context", "question", "answer", "irrelevant_question")
        bad = [k for k in ("context", "question", "answer") if not isinstance(item.get(k), str) or not item[k].strip()]
        bad += [k for k in item if k not in fields] if isinstance(item, dict) else []
        if not isinstance(item, dict) or bad or not isinstance(item.get("irrelevant_question", ""), str):
            raise UsageError(f"{where}: missing, empty or unknown field(s) {bad}. Fix: {DATA_FORMAT}")
        out.append(QAExample(**{k: item[k] for k in fields if k in item}, where=where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UsageError(f"--data {str(path)!r}: the file holds no example. Fix: {DATA_FORMAT}")
    return out


def prompt_texts(context: str, question: str, irrelevant: str) -> dict[str, str]:
    """The three prompt forms of one example (before any chat template)."""
    return {
        "H": f"Context: {context}",
        "H+": f"Question: {question}\nContext: {context}",
        "H-": f"Question: {irrelevant}\nContext: {context}",
    }


def answer_positions(tokenizer, text: str, context: str, answer: str, chat: bool) -> tuple[torch.Tensor, list[int]]:
    """(input_ids (1, L), positions of the answer's tokens): the tokens overlapping the answer's
    characters inside the (last) copy of ``context`` in ``text``."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
    start = text.rfind(context) + context.lower().find(answer.lower())
    end = start + len(answer)
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not chat, return_tensors="pt")
    except NotImplementedError:
        raise UsageError(
            "calibrate seka: the tokenizer gives no character offsets (a slow tokenizer). Fix: load the model's fast "
            "tokenizer (AutoTokenizer with use_fast=True)"
        ) from None
    offsets = enc["offset_mapping"][0].tolist()
    return enc["input_ids"], [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def _irrelevant(examples: Sequence[QAExample], i: int) -> str:
    example = examples[i]
    if example.irrelevant_question:
        return example.irrelevant_question
    if len(examples) < 2:
        raise UsageError(
            f"{example.where}: no irrelevant_question, and no other example to borrow one from. Fix: add "
            '"irrelevant_question", or more examples'
        )
    return examples[(i + 1) % len(examples)].question


class _Done(Exception):
    """Raised by the last layer's hook: the layers above it are not needed."""


class KeyRecorder:
    """Forward hooks on the key projections of ``layers`` that keep the keys (H_kv, D) of chosen
    token positions of a batch-of-one decoder forward, in float64 on the CPU; the forward stops at
    the last of ``layers`` (and never reaches the language-model head)."""

    def __init__(self, arch, layers: list[int]):
        self.arch, self.layers = arch, layers
        self.positions: list[int] = []
        self.found: dict[int, torch.Tensor] = {}
        self.handles = [
            getattr(arch.attention_modules[l], arch.spec.key_projection).register_forward_hook(self._hook(l))
            for l in layers
        ]

    def _hook(self, layer: int):
        arch = self.arch

        def hook(module, args, output):
            keys, _ = archs.key_view(output, arch.spec.key_layout, arch.num_heads, arch.num_kv_heads, arch.head_dim)
            self.found[layer] = keys[0, self.positions].double().cpu()  # (n, H_kv, D)
            if layer == max(self.layers):
                raise _Done

        return hook

    def __call__(self, model, ids: torch.Tensor, positions: list[int]) -> dict[int, torch.Tensor]:
        """layer -> float64 (n, H_kv, D): the keys of ``positions`` in the forward of ``ids`` (1, L)."""
        self.positions, self.found = positions, {}
        device = next(model.parameters()).device
        try:
            with torch.inference_mode():
                self.arch.decoder(input_ids=ids.to(device), use_cache=False)
        except _Done:
            pass
        return self.found

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def leading_count(singular: torch.Tensor, top_pct: float) -> int:
    """1 + the number of leading singular values whose cumulative share stays below ``top_pct``."""
    share = singular.cumsum(0) / singular.sum()
    return min(int((share < top_pct).sum()) + 1, singular.numel())


def head_projections(h, hp, hn, top_pct: float, min_diff: float):
    """Keys float64 (n, D) of one head in the three forms -> (P+, P- (D, D) float64, ||H+ - H-||_F / n,
    ranks (k+, D - k-)); zeros and ranks 0 when the head moves less than ``min_diff``."""
    n, d = h.shape
    diff = float(torch.linalg.norm(hp - hn) / n)
    zero = torch.zeros(d, d, dtype=torch.float64)
    if diff < min_diff or not diff > 0:
        return zero, zero, diff, (0, 0)
    u_pos, s_pos, _ = torch.linalg.svd(h.T @ hp / n)
    u_neg, s_neg, _ = torch.linalg.svd(h.T @ hn / n)
    k_pos, k_neg = leading_count(s_pos, top_pct), leading_count(s_neg, top_pct)
    lead, rest = u_pos[:, :k_pos], u_neg[:, k_neg:]
    return lead @ lead.T, rest @ rest.T, diff, (k_pos, d - k_neg)


def check_settings(top_pct: float, min_diff: float) -> None:
    """``top_pct`` in (0, 1] and ``min_diff`` >= 0, else a UsageError naming the one that is not."""
    if not 0.0 < top_pct <= 1.0:
        raise UsageError(f"top_pct: got {top_pct!r}; allowed: a share in (0, 1], e.g. 0.9 (the released setting)")
    if not min_diff >= 0.0:
        raise UsageError(f"min_diff: got {min_diff!r}; allowed: a number >= 0, e.g. 0.2 (the released setting)")


def build_projections(
    model,
    tokenizer,
    examples: Sequence[QAExample],
    *,
    layers="-10:",
    top_pct: float = 0.9,
    min_diff: float = 0.2,
    chat: bool = False,
    negative: bool = True,
    model_id: str | None = None,
) -> Projections:
    """SEKA's projections of ``model`` from ``examples`` (one forward per example and prompt form).

    ``layers``: a layer selector (default the last ten); ``top_pct`` in (0, 1]; ``min_diff`` >= 0;
    ``chat``: wrap each prompt in the tokenizer's chat template; ``negative``: also build P-.
    Examples whose answer is not in the context, or whose answer tokens differ in number between
    the three prompts, are skipped (listed in ``meta["build"]["skipped"]``). Deterministic."""
    from .. import archs
    from .._version import __version__
    from ..selectors import resolve_layers

    check_settings(top_pct, min_diff)
    if not examples:
        raise UsageError("examples: none given. Fix: pass at least two question-answering examples")
    arch = archs.resolve(model)
    chosen = sorted(set(resolve_layers(validate_layers(layers, "--layers"), arch.num_layers, "--layers")))
    recorder = KeyRecorder(arch, chosen)
    keys = {form: {l: [] for l in chosen} for form in FORMS}
    skipped, used, record = [], [], []
    try:
        for i, ex in enumerate(examples):
            irrelevant = _irrelevant(examples, i)
            if ex.answer.lower() not in ex.context.lower():
                skipped.append(f"{ex.where}: the answer is not in the context")
                continue
            texts = prompt_texts(ex.context, ex.question, irrelevant)
            found = {f: answer_positions(tokenizer, texts[f], ex.context, ex.answer, chat) for f in FORMS}
            counts = {len(found[f][1]) for f in FORMS}
            if len(counts) != 1 or 0 in counts:
                skipped.append(f"{ex.where}: the answer's tokens differ between the prompt forms ({sorted(counts)})")
                continue
            for form in FORMS:
                for layer, k in recorder(model, *found[form]).items():
                    keys[form][layer].append(k)
            used.append(ex.where)
            record.append([ex.context, ex.question, irrelevant, ex.answer])
    finally:
        recorder.remove()
    if not used:
        raise UsageError(
            f"calibrate seka: no usable example ({len(skipped)} skipped: {'; '.join(skipped[:3])}). Fix: give examples "
            "whose answer is a span of the context"
        )
    pos, neg, diffs, ranks = {}, {}, {}, {}
    for layer in chosen:
        h, hp, hn = (torch.cat(keys[f][layer]) for f in FORMS)  # (n, H_kv, D)
        heads = [head_projections(h[:, j], hp[:, j], hn[:, j], top_pct, min_diff) for j in range(arch.num_kv_heads)]
        pos[layer] = torch.stack([p for p, _, _, _ in heads]).float()
        neg[layer] = torch.stack([q for _, q, _, _ in heads]).float()
        diffs[str(layer)] = [round(d, 6) for _, _, d, _ in heads]
        ranks[str(layer)] = [list(r) for _, _, _, r in heads]
    digest = hashlib.sha256(json.dumps([record, bool(chat)], ensure_ascii=False).encode()).hexdigest()
    meta = {
        "model_type": arch.spec.model_type,
        "num_layers": arch.num_layers,
        "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_size": getattr(arch.text_config, "hidden_size", None),
        "key_site": arch.spec.key_projection,
        "layers": chosen,
        "negative": negative,
        "top_pct": top_pct,
        "min_diff": min_diff,
        "projected": {str(l): [j for j, r in enumerate(ranks[str(l)]) if r[0]] for l in chosen},
        "norm_diff": diffs,
        "ranks": ranks,
        "build": {
            "model": model_id,
            "examples": len(examples),
            "used": len(used),
            "tokens": int(sum(k.shape[0] for k in keys["H"][chosen[0]])),
            "skipped": skipped,
            "template": "chat" if chat else "plain",
            "examples_sha256": digest,
            "attnsteer": __version__,
        },
    }
    return Projections(pos, neg if negative else None, meta)


# ==== the recipe and the command ====================================================================
def projection_file_for(out: str | Path) -> tuple[Path, Path]:
    """(recipe file, projection file beside it) for ``--out``: ``X.yaml`` -> ``X.seka.safetensors``;
    a folder -> ``recipe.yaml`` and ``seka-projections.safetensors`` in it."""
    from ..recipe import RECIPE_FILENAME

    out = Path(out).expanduser()
    if out.is_dir() or out.suffix == "":
        return out / RECIPE_FILENAME, out / "seka-projections.safetensors"
    return out, out.with_name(f"{out.stem}.seka.safetensors")


def seka_recipe(projections: Projections, file: Path, *, g_pos: float = 0.8, g_neg: float = 0.2, name=None, source=""):
    """The recipe steering the layers of ``projections`` that have a projected head, naming the
    saved ``file`` (beside the recipe) by its name and sha256."""
    from ..recipe import Recipe, file_sha256

    meta = projections.meta
    layers = [l for l in meta["layers"] if meta["projected"][str(l)]]
    if not layers:
        raise UsageError(
            f"calibrate seka: no head of layers {meta['layers']} moves by min_diff {meta['min_diff']:g} between the "
            f"relevant and irrelevant questions (largest ||H+ - H-||_F / n: "
            f"{max(max(d) for d in meta['norm_diff'].values()):.4g}). Fix: lower --min-diff"
        )
    params = {"g_pos": g_pos, "g_neg": g_neg, "projections": {"path": file.name, "sha256": file_sha256(file)}}
    data = {
        "name": name or f"seka-{meta['model_type']}",
        "description": f"SEKA with projections built by attnsteer calibrate seka ({len(layers)} layers); steer "
        "toward a span marked with handle.focus(mask)",
        "source": source,
        "model_types": [meta["model_type"]],
        "interventions": [{"method": "seka", "layers": layers, "params": params}],
    }
    return Recipe.from_dict(data, origin="calibrated recipe", folder=file.parent)


def format_table(projections: Projections) -> str:
    meta = projections.meta
    lines = [
        f"SEKA projections: {meta['build']['used']} of {meta['build']['examples']} examples, "
        f"{meta['build']['tokens']} answer tokens; top_pct {meta['top_pct']:g}, min_diff {meta['min_diff']:g}",
        "",
        "| layer | projected kv heads | norm(H+ - H-) / n per kv head | rank P+ / P- |",
        "|---:|:---|:---|:---|",
    ]
    for l in meta["layers"]:
        diffs = ", ".join(f"{d:.3g}" for d in meta["norm_diff"][str(l)])
        ranks = ", ".join(f"{a}/{b}" for a, b in meta["ranks"][str(l)])
        lines.append(f"| {l} | {meta['projected'][str(l)] or 'none'} | {diffs} | {ranks} |")
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class SekaCalibrationConfig:
    """The settings of ``attnsteer calibrate seka``; each field is the flag of the same name
    (``top_pct`` is ``--top-pct``; ``negative=False`` is ``--no-negative``), with the same default.

    data: the examples, :data:`DATA_FORMAT`. out: the recipe to write (``X.yaml`` gets
    ``X.seka.safetensors`` beside it; a folder gets ``recipe.yaml`` and ``seka-projections.safetensors``).
    model / model_args: the model to load (``smollm2``: the embedded SmolLM2; a folder; a hub id), also
    when one is passed loaded: its id names the recipe and goes into its ``source``. layers: the layers to build projections for (default the last
    ten). top_pct, min_diff, chat, negative: as :func:`build_projections`. g_pos / g_neg: the
    recipe's gains. limit: only the first N examples (None: all). name: the recipe's name (default
    ``seka-<model name>``).

    Bad values raise :class:`~attnsteer.errors.UsageError` naming the flag, the value and the fix.
    """

    data: str | Path
    out: str | Path
    model: str | None = None
    model_args: str | None = None
    layers: str | int | Sequence[int] = "-10:"
    top_pct: float = 0.9
    min_diff: float = 0.2
    chat: bool = False
    negative: bool = True
    g_pos: float = 0.8
    g_neg: float = 0.2
    limit: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        for name in ("top_pct", "min_diff", "g_pos", "g_neg"):
            default = self.__dataclass_fields__[name].default
            check_number(getattr(self, name), "--" + name.replace("_", "-"), f"{default} (the default)")
        check_settings(self.top_pct, self.min_diff)
        try:
            validate_layers(_layer_spec(self.layers), "--layers")
        except RecipeError as exc:
            raise UsageError(str(exc)) from None
        check_count(self.limit, "--limit", "8 (or leave it out: every example)", optional=True)


def _layer_spec(layers):
    """A layer selector as :func:`~attnsteer.selectors.validate_layers` takes it (a sequence as a list)."""
    return layers if isinstance(layers, (str, int)) else list(layers)


@dataclass(frozen=True)
class SekaCalibrationResult:
    """What :func:`calibrate` wrote: the recipe (``path``) naming the projection file
    (``projections_path``), and the projections themselves (``.meta``: per-layer table data)."""

    recipe: Recipe
    path: Path
    projections_path: Path
    projections: Projections

    @property
    def projected_heads(self) -> int:
        """kv heads that got a projection, over all layers."""
        return sum(map(len, self.projections.meta["projected"].values()))


def calibrate(config: SekaCalibrationConfig, *, loaded=None, progress: Progress | None = None) -> SekaCalibrationResult:
    """Build SEKA's projections as ``config`` says and write them with the recipe naming them.

    ``loaded``: an already loaded ``(tokenizer, model)`` for ``config.model`` (else it is loaded
    here); ``progress``: called with each log line (loading the model; None: silent). ``--out`` and
    the data are checked before the model loads."""
    from .. import models
    from .var import check_out

    check_out(config.out)
    examples = read_examples(config.data, config.limit)
    model_id, kwargs = models.resolve_model(config.model, config.model_args)
    tokenizer, model = loaded if loaded is not None else models.load_checked(model_id, kwargs, LineStream(progress))
    projections = build_projections(
        model,
        tokenizer,
        examples,
        layers=_layer_spec(config.layers),
        top_pct=config.top_pct,
        min_diff=config.min_diff,
        chat=config.chat,
        negative=config.negative,
        model_id=model_id,
    )
    recipe_file, file = projection_file_for(config.out)
    file.parent.mkdir(parents=True, exist_ok=True)
    projections.save(file)
    source = (
        f"attnsteer calibrate seka on {model_id}, {projections.meta['build']['used']} examples from {config.data} "
        f"(sha256 {projections.meta['build']['examples_sha256'][:12]}), layers {config.layers}, top_pct "
        f"{config.top_pct:g}, min_diff {config.min_diff:g}, {'chat' if config.chat else 'plain'} prompts"
    )
    name = config.name or f"seka-{model_id.rstrip('/').split('/')[-1]}"
    recipe = seka_recipe(projections, file, g_pos=config.g_pos, g_neg=config.g_neg, name=name, source=source)
    out = recipe.save(recipe_file)
    return SekaCalibrationResult(recipe, Path(out), file, projections)
