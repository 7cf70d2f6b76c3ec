"""Pictures of what a recipe does to attention (``attnsteer inspect``): PIL only, numbers kept.

One forward of one prompt, unsteered (baseline) and steered by each recipe, observed with
:class:`attnsteer.attention.observe.LastRows`: per layer and head, the last prompt row's attention
(the row that predicts the answer's first token), never the full map. Baseline panels show the
unsteered model's softmax weights; steered panels the weights the steered model actually uses
(the recipe's score and weight rules applied to that row; see ``docs/inspect.md``).

Pictures, ``<label>_<picture>.png`` per recipe label:

* ``head_share``: layers x heads, the last row's attention share on the image tokens (text-only
  prompts: on the sink keys the recipe found, else on the first token), baseline | steered; heads
  whose row the recipe's rules changed, and the heads a method reports (VHR's selected, SPIN's
  kept), outlined;
* ``sinks``: layers x prompt tokens, the sinks ACT (fraction of heads) and VAR (hidden-state
  sinks) found;
* ``<method>_heads`` (``vhr_heads``, ``spin_heads``): layers x heads, the heads a method's report
  names at the last prompt row (``{"heads": [per batch row [heads]]}``);
* ``image_attention``: the last row's attention over the image-token grid laid over the image the
  model saw, baseline | steered.

Every number drawn is written to ``inspect.json`` with where it was drawn (panel boxes in pixels).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import api, archs
from .attention.observe import LastRows, observe
from .errors import AttnsteerWarning

# viridis-like anchors (dark blue -> yellow), linearly interpolated
ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
NAN_COLOUR = (205, 205, 205)  # "not applicable" cells
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
RULE_MARK = (230, 30, 30)  # heads whose last row the recipe's rules changed
VHR_MARK = (255, 255, 255)  # heads VHR selected (and heads other methods report, unless HEAD_REPORTS says)
IMAGE_BAND = (255, 140, 0)  # image-token columns
PAD, GAP, LINE = 10, 24, 14


@dataclass(frozen=True)
class HeadReport:
    """How the pictures word and mark the heads a method's report names."""

    verb: str  # "heads VHR <verb> at the last prompt token"
    effect: str  # what the method does to them, for the head-share legend
    caption: str  # the heads picture's panel caption
    note: str  # what the report leaves out
    mark: tuple[int, int, int] = VHR_MARK  # the outline on the head-share picture
    mark_name: str = "white"


# methods whose report is {"heads": [per batch row [heads]]}; others reporting heads get generic wording
HEAD_REPORTS = {
    "vhr": HeadReport(
        "selected",
        "output scaled by alpha",
        "VHR selection",
        "VHR's report gives the selection only, not its VHD scores",
    ),
    "spin": HeadReport(
        "kept",
        "the row's other heads scaled by eps",
        "SPIN kept heads",
        "SPIN's report gives the kept heads only, not their image attention",
        (255, 105, 180),
        "pink",
    ),
}


def head_report(method: str) -> HeadReport:
    name = method.upper()
    return HEAD_REPORTS.get(method) or HeadReport(
        "reported", "", f"{name} heads", f"{name}'s report gives the heads only"
    )


def colormap(values, vmin: float, vmax: float) -> np.ndarray:
    """float array (NaN = n/a) -> uint8 RGB (..., 3), ``vmin``..``vmax`` onto the anchors."""
    v = np.asarray(values, dtype=np.float64)
    span = vmax - vmin
    t = np.clip(np.nan_to_num((v - vmin) / span if span > 0 else np.zeros_like(v)), 0.0, 1.0)
    x = t * (len(ANCHORS) - 1)
    i = np.minimum(np.floor(x).astype(int), len(ANCHORS) - 2)
    f = (x - i)[..., None]
    rgb = np.rint(ANCHORS[i] * (1 - f) + ANCHORS[i + 1] * f).astype(np.uint8)
    rgb[np.isnan(v)] = NAN_COLOUR
    return rgb


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_width(text: str) -> int:
    return int(math.ceil(_font().getlength(text)))


# ---- panels and figures ---------------------------------------------------------------------------
@dataclass
class Panel:
    """One heatmap: values (R, C) drawn in cells of ``cell`` (w, h) pixels, or laid over ``image``."""

    caption: str
    values: np.ndarray
    cell: tuple[int, int]
    row_name: str = "layer"
    col_name: str = "head"
    col_labels: list[str] | None = None
    col_band: list[bool] | None = None  # columns marked under the grid (image tokens)
    marks: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # kind -> [(row, col)]
    image: np.ndarray | None = None  # uint8 (H, W, 3): blend the heatmap over it (alpha 0.5)


def _every(cell: int, need: int) -> int:
    return max(1, math.ceil(need / max(cell, 1)))


def _render(panel: Panel, vmin: float, vmax: float):
    """-> (PIL image of the panel, (x, y) of its heat area inside it)."""
    from PIL import Image, ImageDraw

    rows, cols = panel.values.shape
    cw, ch = panel.cell
    heat = Image.fromarray(colormap(panel.values, vmin, vmax)).resize((cols * cw, rows * ch), Image.NEAREST)
    if panel.image is not None:
        base = Image.fromarray(panel.image).convert("RGB").resize(heat.size, Image.NEAREST)
        heat = Image.blend(base, heat, 0.5)
    left = 0 if panel.image is not None else _text_width(f"{panel.row_name} {rows - 1}") + 6
    label_h = 0
    if panel.image is None:
        labels = panel.col_labels if panel.col_labels and cw >= LINE - 2 else None
        label_h = (max(map(_text_width, labels)) if labels else LINE) + 6 + (6 if panel.col_band else 0)
    top = LINE + 4
    width = max(left + heat.width, _text_width(panel.caption)) + 2
    height = top + heat.height + label_h + (LINE + 2 if panel.image is None else 0)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((0, 0), panel.caption, fill=INK, font=_font())
    img.paste(heat, (left, top))
    for r, c in panel.marks.get("rule_changed", []):  # an outline on the cell's edge
        x, y = left + c * cw, top + r * ch
        draw.rectangle([x, y, x + cw - 1, y + ch - 1], outline=RULE_MARK, width=2)
    for kind, cells in panel.marks.items():  # a method's reported heads: an inner outline, or a corner dot
        colour = head_report(kind).mark
        for r, c in cells if kind != "rule_changed" else ():
            x, y = left + c * cw, top + r * ch
            if min(cw, ch) >= 14:
                draw.rectangle([x + 3, y + 3, x + cw - 4, y + ch - 4], outline=colour, width=2)
            else:
                draw.rectangle([x + 2, y + 2, x + 3, y + 3], fill=colour)
    if panel.image is not None:
        return img, (left, top)
    step = _every(ch, LINE)
    for r in range(0, rows, step):
        draw.text((0, top + r * ch + ch / 2 - 6), f"{panel.row_name} {r}", fill=INK, font=_font())
    y = top + heat.height + 2
    if panel.col_band:
        for c, on in enumerate(panel.col_band):
            if on:
                draw.rectangle([left + c * cw, y, left + (c + 1) * cw - 1, y + 3], fill=IMAGE_BAND)
        y += 6
    if panel.col_labels and cw >= LINE - 2:
        for c, text in enumerate(panel.col_labels):  # one rotated label per column
            stamp = Image.new("L", (_text_width(text) + 2, LINE), 0)
            ImageDraw.Draw(stamp).text((1, 0), text, fill=255, font=_font())
            stamp = stamp.rotate(90, expand=True)
            img.paste(Image.new("RGB", stamp.size, INK), (left + c * cw + (cw - stamp.width) // 2, y), stamp)
    else:
        step = _every(cw, _text_width(f"{cols - 1}") + 8)
        for c in range(0, cols, step):
            draw.text((left + c * cw, y), str(c), fill=INK, font=_font())
    draw.text((left, height - LINE), f"columns: {panel.col_name}", fill=INK, font=_font())
    return img, (left, top)


def figure(path: Path, title: list[str], panels: list[Panel], vmin: float, vmax: float, legend: list[str]) -> dict:
    """Draw ``panels`` side by side under ``title`` with a colour bar; returns the record of what was drawn."""
    from PIL import Image, ImageDraw

    rendered = [_render(p, vmin, vmax) for p in panels]
    text = title + legend
    head = len(title) * LINE + 6
    body_w = sum(img.width for img, _ in rendered) + GAP * (len(rendered) - 1)
    body_h = max(img.height for img, _ in rendered)
    width = 2 * PAD + max([body_w, 220] + [_text_width(t) for t in text])
    height = PAD + head + body_h + 10 + 30 + len(legend) * LINE + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((PAD, PAD + i * LINE), line, fill=INK, font=_font())
    x, boxes = PAD, []
    for panel, (img, (hx, hy)) in zip(panels, rendered):
        y = PAD + head
        canvas.paste(img, (x, y))
        rows, cols = panel.values.shape
        boxes.append([x + hx, y + hy, x + hx + cols * panel.cell[0], y + hy + rows * panel.cell[1]])
        x += img.width + GAP
    bar_y = PAD + head + body_h + 10
    ramp = colormap(np.linspace(vmin, vmax, 200)[None, :].repeat(10, 0), vmin, vmax)
    canvas.paste(Image.fromarray(ramp), (PAD, bar_y))
    draw.text((PAD, bar_y + 12), f"{vmin:.3g}", fill=INK, font=_font())
    draw.text((PAD + 200 - _text_width(f"{vmax:.3g}"), bar_y + 12), f"{vmax:.3g}", fill=INK, font=_font())
    for i, line in enumerate(legend):
        draw.text((PAD, bar_y + 30 + i * LINE), line, fill=INK, font=_font())
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return {
        "path": str(path),
        "title": title,
        "legend": legend,
        "vmin": vmin,
        "vmax": vmax,
        "panels": [
            {
                "caption": p.caption,
                "box": box,
                "cell": list(p.cell),
                "values": [[None if math.isnan(v) else v for v in row] for row in p.values.tolist()],
                "marks": {kind: [list(rc) for rc in cells] for kind, cells in p.marks.items()},
            }
            for p, box in zip(panels, boxes)
        ],
    }


# ---- what one forward shows -------------------------------------------------------------------------
@dataclass
class Capture:
    """The last prompt row's attention of one forward, per layer: (H, K) float arrays."""

    label: str
    weights: dict[int, np.ndarray]  # baseline: softmax(q k^T); steered: the weights the layer uses
    changed: dict[int, list[int]] = field(default_factory=dict)  # heads whose row the rules changed
    steered_layers: list[int] = field(default_factory=list)
    act_sinks: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # layer -> head -> keys
    var_sinks: dict[int, list[int]] = field(default_factory=dict)  # layer -> keys
    heads: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # method -> layer -> reported heads
    # method -> layer -> the factor on each prompt key's scores (VAF's groups), from ``key_factors`` reports
    key_factors: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    @property
    def vhr_heads(self) -> dict[int, list[int]]:
        return self.heads.get("vhr", {})


def capture(model, inputs: dict, label: str = "baseline", handle=None) -> Capture:
    """Run ``model(**inputs)`` (one prompt, no cache) and keep each layer's last-row weights."""
    rows = LastRows.of_handle(handle, batch=1) if handle is not None else LastRows(batch=1)
    with observe(model, rows), torch.inference_mode():
        model(**inputs, use_cache=False)
    post = rows.finish()
    cap = Capture(label, {layer: w[0].double().cpu().numpy() for layer, w in post.items()})
    if handle is not None:
        cap.steered_layers = sorted(handle.plans)
        cap.changed = {layer: rows.changed(layer)[0].nonzero().flatten().tolist() for layer in cap.steered_layers}
        cap.act_sinks = {layer: found[0] for layer, found in handle.sinks().items()}
        report = handle.report()
        cap.var_sinks = {layer: by["var"]["sinks"][0] for layer, by in report.items() if "var" in by}
        cap.heads = first_row_reports(report, "heads")
        cap.key_factors = first_row_reports(report, "key_factors")
    return cap


def first_row_reports(report: dict, name: str) -> dict[str, dict[int, list]]:
    """method -> layer -> what its report gives under ``name`` for the first batch row
    (``{name: [per batch row [...]]}``): ``heads`` (VHR's selected, SPIN's kept), ``key_factors``
    (VAF's factor on each prompt key)."""
    out: dict[str, dict[int, list]] = {}
    for layer, by_method in report.items():
        for method, found in by_method.items():
            if isinstance(found, dict) and found.get(name):
                out.setdefault(method, {})[layer] = found[name][0]
    return out


def _cells(count: int, room: int, low: int, high: int) -> int:
    return int(min(high, max(low, room // max(count, 1))))


def head_share(cap: Capture, keys) -> np.ndarray:
    """(L, H): each head's last-row weight on ``keys(layer, head)`` (a list of key positions, or
    None for n/a)."""
    layers = sorted(cap.weights)
    heads = cap.weights[layers[0]].shape[0]
    out = np.full((len(layers), heads), np.nan)
    for layer in layers:
        for head in range(heads):
            chosen = keys(layer, head)
            if chosen is not None:
                out[layer, head] = float(cap.weights[layer][head, chosen].sum())
    return out


def _share_keys(cap: Capture, image_positions: list[int]):
    """What the head-share picture measures: (description, keys(layer, head))."""
    if image_positions:
        return "the image tokens", lambda layer, head: image_positions
    if cap.act_sinks:
        return (
            "the hidden sinks ACT found (per layer and head; grey: none found)",
            lambda layer, head: cap.act_sinks.get(layer, {}).get(head) or None,
        )
    if cap.var_sinks:
        return "the hidden-state sinks VAR found (grey: none)", lambda layer, head: cap.var_sinks.get(layer) or None
    return "the first token (no image, no sinks reported)", lambda layer, head: [0]


BASELINE_CAPTION = "baseline: softmax(q k^T) of the unsteered model"


def _steered_caption(label: str) -> str:
    return f"{label}: steered weights (what the steered model uses)"


STEERED_NOTE = [
    "steered panel: the recipe's score and weight rules (PAI, softplus, ACT, VAR) applied to the last row",
    "the steered model computed; VHR and SPIN only scale head outputs, so they show from the next layer on",
]


def picture_head_share(out: Path, base: Capture, cap: Capture, image_positions: list[int]) -> dict:
    what, keys = _share_keys(cap, image_positions)
    before, after = head_share(base, keys), head_share(cap, keys)
    layers, heads = before.shape
    cell = (_cells(heads, 640, 8, 32), _cells(layers, 480, 6, 24))
    rule = [(layer, h) for layer, hs in cap.changed.items() for h in hs]
    marks = {"rule_changed": rule}
    legend = [f"red outline: the recipe's rules changed this head's last row ({len(rule)} heads)"] if rule else []
    for method, by_layer in cap.heads.items():
        marks[method] = [(layer, h) for layer, hs in by_layer.items() for h in hs]
        how = head_report(method)
        effect = f" ({how.effect})" if how.effect else ""
        legend.append(
            f"{how.mark_name} inner outline (small cells: corner dot): a head {method.upper()} {how.verb}{effect}"
        )
    finite = np.concatenate([before[np.isfinite(before)], after[np.isfinite(after)]])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return figure(
        out / f"{cap.label}_head_share.png",
        [f"{cap.label}: attention share of the last prompt row on {what}", "per layer (rows) and head (columns)"],
        [Panel(BASELINE_CAPTION, before, cell), Panel(_steered_caption(cap.label), after, cell, marks=marks)],
        0.0,
        vmax,
        legend + STEERED_NOTE,
    )


def picture_sinks(out: Path, cap: Capture, tokens: list[str], image_positions: list[int]) -> dict | None:
    layers = len(cap.weights)
    heads = next(iter(cap.weights.values())).shape[0]
    n = len(tokens)
    cell = (_cells(n, 1200, 2, 22), _cells(layers, 480, 4, 20))
    band = [i in set(image_positions) for i in range(n)] if image_positions else None
    panels = []
    if cap.act_sinks:
        grid = np.full((layers, n), np.nan)
        for layer, by_head in cap.act_sinks.items():
            grid[layer] = 0.0
            for positions in by_head.values():
                grid[layer, positions] += 1.0 / heads
        panels.append(Panel("ACT sinks: fraction of heads", grid, cell, col_name="prompt token", col_labels=tokens))
    if cap.var_sinks:
        grid = np.full((layers, n), np.nan)
        for layer, positions in cap.var_sinks.items():
            grid[layer] = 0.0
            grid[layer, positions] = 1.0
        panels.append(Panel("VAR hidden-state sinks", grid, cell, col_name="prompt token", col_labels=tokens))
    if not panels:
        return None
    for panel in panels:
        panel.col_band = band
    return figure(
        out / f"{cap.label}_sinks.png",
        [f"{cap.label}: sink tokens per layer (rows) over the prompt tokens (columns)"],
        panels,
        0.0,
        1.0,
        ["grey: layer not steered by the method"] + (["orange band: image tokens"] if band else []),
    )


def picture_key_factors(out: Path, cap: Capture, method: str, tokens: list[str], image_positions) -> dict | None:
    """``<label>_<method>_key_factors.png``: per layer (rows) and prompt token (columns), the factor
    ``method`` puts on that key's scores in the rows it steers (VAF: alpha on image keys, beta on the
    system prompt, 1 elsewhere); grey: layers it does not steer."""
    found = cap.key_factors.get(method)
    if not found:
        return None
    n = len(tokens)
    grid = np.full((len(cap.weights), n), np.nan)
    for layer, factors in found.items():
        grid[layer, : len(factors)] = factors[:n]
    values = grid[~np.isnan(grid)]
    vmin, vmax = float(min(values.min(), 1.0)), float(max(values.max(), 1.0))
    cell = (_cells(n, 1200, 2, 22), _cells(len(cap.weights), 480, 4, 20))
    panel = Panel(f"{method}: factor on each key's scores", grid, cell, col_name="prompt token", col_labels=tokens)
    if image_positions:
        panel.col_band = [i in set(image_positions) for i in range(n)]
    return figure(
        out / f"{cap.label}_{method}_key_factors.png",
        [f"{cap.label}: the factor {method} multiplies each prompt key's scores by, per layer (rows)"],
        [panel],
        vmin if vmin < vmax else vmin - 1.0,
        vmax,
        ["grey: layer not steered by the method; 1: the key is left alone"]
        + (["orange band: image tokens"] if image_positions else []),
    )


def picture_heads(out: Path, cap: Capture, method: str) -> dict | None:
    """``<label>_<method>_heads.png``: the heads ``method``'s report names per layer (yellow)."""
    if not cap.heads.get(method):
        return None
    layers = len(cap.weights)
    heads = next(iter(cap.weights.values())).shape[0]
    grid = np.full((layers, heads), np.nan)
    for layer, chosen in cap.heads[method].items():
        grid[layer] = 0.0
        grid[layer, chosen] = 1.0
    cell = (_cells(heads, 640, 8, 32), _cells(layers, 480, 6, 24))
    how, name = head_report(method), method.upper()
    return figure(
        out / f"{cap.label}_{method}_heads.png",
        [
            f"{cap.label}: heads {name} {how.verb} at the last prompt token (yellow), per layer (rows) and head (columns)"
        ],
        [Panel(how.caption, grid, cell)],
        0.0,
        1.0,
        [f"grey: layer not steered by {name}; {how.note}"],
    )


def picture_image_attention(
    out: Path, base: Capture, cap: Capture, image_positions: list[int], side: int, image: np.ndarray
) -> dict:
    layers = cap.steered_layers or sorted(cap.weights)

    def grid(c: Capture) -> np.ndarray:
        mean = np.mean([c.weights[layer][:, image_positions].mean(0) for layer in layers], axis=0)
        return mean.reshape(side, side)

    before, after = grid(base), grid(cap)
    vmax = float(max(before.max(), after.max())) or 1.0
    scale = max(1, 192 // max(image.shape[:2]))
    cell = (image.shape[1] * scale // side, image.shape[0] * scale // side)
    span = (
        f"layers {layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else f"layers {layers}"
    )
    return figure(
        out / f"{cap.label}_image_attention.png",
        [
            f"{cap.label}: the last prompt row's attention on each image token, mean over the heads of {span}",
            f"laid over the image the model saw ({side} x {side} image tokens, alpha 0.5)",
        ],
        [
            Panel(BASELINE_CAPTION, before, cell, image=image),
            Panel(_steered_caption(cap.label), after, cell, image=image),
        ],
        0.0,
        vmax,
        STEERED_NOTE,
    )


# ---- the whole inspection --------------------------------------------------------------------------
def image_grid_side(model, n_image_tokens: int) -> int | None:
    """Side of the square image-token grid (LLaVA: vision image_size // patch_size), or None when the
    prompt's image tokens do not form one such grid (tiles, merged patches, query tokens)."""
    vision = getattr(model.config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int) or not patch:
        return None
    side = size // patch
    return side if side * side == n_image_tokens else None


def pixels_as_image(pixel_values, processor) -> np.ndarray | None:
    """uint8 (H, W, 3) of the first image's processed pixels (what the vision tower saw), or None."""
    if pixel_values is None or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        return None
    ip = getattr(processor, "image_processor", None)
    mean = np.asarray(getattr(ip, "image_mean", None) or [0.5] * 3, dtype=np.float64).reshape(3, 1, 1)
    std = np.asarray(getattr(ip, "image_std", None) or [0.5] * 3, dtype=np.float64).reshape(3, 1, 1)
    x = pixel_values[0].double().cpu().numpy() * std + mean
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def token_labels(tokenizer, ids) -> list[str]:
    """Short printable labels of prompt tokens (``_`` for a leading space)."""
    out = []
    for tok in tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
        text = str(tok).replace("Ġ", "_").replace("▁", "_").replace("Ċ", "\\n")
        text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
        out.append(text[:10] or "''")
    return out


def inspect(
    model,
    inputs: dict,
    recipes: list,
    out_dir,
    *,
    tokens: list[str],
    backend: str = "auto",
    processor=None,
    meta: dict | None = None,
) -> dict:
    """Write the pictures of every ``(label, recipe)`` and ``inspect.json`` to ``out_dir``; returns the record.

    ``inputs``: one prompt (batch 1) as ``model(**inputs)`` takes it (images included for a VLM).
    """
    out = Path(out_dir)
    arch = archs.resolve(model)
    ids = inputs["input_ids"][0]
    image_ids = set(arch.image_token_ids)
    image_positions = [i for i, t in enumerate(ids.tolist()) if t in image_ids]
    side = image_grid_side(model, len(image_positions)) if image_positions else None
    image = pixels_as_image(inputs.get("pixel_values"), processor) if side else None
    base = capture(model, inputs)
    record: dict = {
        **(meta or {}),
        "tokens": tokens,
        "image_positions": image_positions,
        "image_grid": [side, side] if image is not None else None,
        "shows": {
            "baseline": "softmax(q k^T * scaling + mask) of the last prompt row in the unsteered model",
            "steered": "the weights the steered model uses at the last prompt row: the recipe's score and weight "
            "rules applied to the softmax of the row it observed (equal to softmax(q k^T) in layers it does not "
            "steer)",
        },
        "recipes": {},
        "pictures": [],
        "skipped": [],
        "notes": [],
    }
    for label, recipe in recipes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AttnsteerWarning)
            with api.apply(model, recipe, backend=backend, processor=processor) as handle:
                cap = capture(model, inputs, label, handle)
        record["notes"] += [f"{label}: {w.message}" for w in caught if issubclass(w.category, AttnsteerWarning)]
        record["recipes"][label] = {
            "recipe": recipe.name,
            "steered_layers": cap.steered_layers,
            "rule_changed_heads": cap.changed,
            "act_sinks": cap.act_sinks,
            "var_sinks": cap.var_sinks,
            "vhr_heads": cap.vhr_heads,
            **{f"{method}_heads": by_layer for method, by_layer in cap.heads.items() if method != "vhr"},
        }
        drawn = [
            ("head_share", picture_head_share(out, base, cap, image_positions)),
            ("sinks", picture_sinks(out, cap, tokens, image_positions)),
            *[(f"{method}_heads", picture_heads(out, cap, method)) for method in cap.heads],
            *[
                (f"{method}_key_factors", picture_key_factors(out, cap, method, tokens, image_positions))
                for method in cap.key_factors
            ],
        ]
        if not cap.heads:
            drawn.append(("heads", None))
        if image is not None:
            drawn.append(("image_attention", picture_image_attention(out, base, cap, image_positions, side, image)))
        elif image_positions:
            why = (
                "the pixel values are not one (3, H, W) image"
                if side
                else f"the {len(image_positions)} image tokens do not form the vision tower's square grid (tiles, "
                "merged patches or query tokens)"
            )
            record["skipped"].append(f"{label}_image_attention: {why}")
        for name, pic in drawn:
            if pic is None:
                record["skipped"].append(f"{label}_{name}: the recipe reports nothing to draw")
            else:
                record["pictures"].append({"label": label, "picture": name, **pic})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "inspect.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    record["json"] = str(path)
    return record
