"""``attnsteer demo`` and the timed greedy generation shared with ``attnsteer generate``.

Everything here writes plain ASCII decorations (the generated text itself may be any Unicode),
results to ``out`` (stdout) and progress lines to ``err`` (stderr), so ``attnsteer generate ... >
file`` keeps only the answers.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import torch

from .console import one_line, quiet_transformers, term_width, wrap, wrap_items
from .errors import AttnsteerWarning
from .methods.act import ACT
from .models import describe_model, load_with_progress
from .recipe import BASELINE_LABEL, label_recipes

DEMO_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying focused while studying.",
    "Tom has 3 apples and buys 5 more. He eats 2. How many apples does he have now?",
)
DEMO_RECIPES = ("act-default", "softplus-gentle")
DEMO_MAX_NEW_TOKENS = 40
BASELINE = BASELINE_LABEL

# how the sink summary is cut down for a terminal
SINK_DETAIL_LAYERS = 3
SINK_POSITIONS_PER_HEAD = 3
SINK_TOP_POSITIONS = 5


# ---- terminal helpers ---------------------------------------------------------------------------
def token_text(tokenizer, token_id: int, limit: int = 14) -> str:
    """A token shown the way Python shows strings (whitespace visible), shortened."""
    text = repr(tokenizer.decode([int(token_id)]))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ---- timed greedy generation ------------------------------------------------------------------
@dataclass
class Timing:
    """One ``generate`` call of one batch."""

    prefill_s: float  # from the call to the first token's logits (prompt forward)
    decode_s: float  # from the first token's logits to the end
    steps: int  # tokens generated for the batch (the longest row)
    batch: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def decode_tps(self) -> float | None:
        """Decode tokens per second per row (the first token comes from the prefill)."""
        if self.steps < 2 or self.decode_s <= 0:
            return None
        return (self.steps - 1) / self.decode_s


@dataclass
class Generation:
    label: str
    text: str
    new_tokens: int
    timing: Timing
    same_as_baseline: bool | None = None


@dataclass
class PromptResult:
    prompt: str
    input_ids: list[int]  # the prompt row as the model saw it (padded layout)
    prompt_tokens: int  # its real (non-padding) tokens
    outputs: dict[str, Generation] = field(default_factory=dict)
    sinks: dict[str, dict[int, dict[int, list[int]]]] = field(default_factory=dict)  # label -> layer -> head -> pos


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstLogitsClock:
    """A logits processor that records when the first token's logits exist (end of prefill)."""

    def __init__(self, device):
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            _sync(self.device)
            self.first = time.perf_counter()
        return scores


def build_inputs(tokenizer, prompts: list[str], chat: bool, device):
    """Tokenise a batch of prompts (left-padded), through the chat template when ``chat``."""
    if chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def greedy_config(model, tokenizer, max_new_tokens: int):
    config = copy.deepcopy(model.generation_config)
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config.update(
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return config


def timed_generate(model, tokenizer, inputs: dict, max_new_tokens: int) -> tuple[list[str], list[int], Timing]:
    """Greedy ``model.generate``; returns the decoded answers, their token counts and the timing."""
    from transformers import LogitsProcessorList

    device = inputs["input_ids"].device
    config = greedy_config(model, tokenizer, max_new_tokens)
    clock = _FirstLogitsClock(device)
    prompt_len = inputs["input_ids"].shape[1]
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config, logits_processor=LogitsProcessorList([clock]))
    _sync(device)
    end = time.perf_counter()
    first = clock.first if clock.first is not None else end
    new = out[:, prompt_len:]
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    texts, counts = [], []
    for row in new.tolist():
        n = len(row)
        for i, tok in enumerate(row):
            if tok in eos_ids:
                n = i + 1
                break
        counts.append(n)
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    timing = Timing(prefill_s=first - start, decode_s=end - first, steps=new.shape[1], batch=new.shape[0])
    return texts, counts, timing


def _collect_warnings(record, notes: list[str]) -> None:
    for w in record:
        if issubclass(w.category, AttnsteerWarning):
            msg = str(w.message)
            if msg not in notes:
                notes.append(msg)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def run_prompts(
    model,
    tokenizer,
    prompts: list[str],
    recipes: list[tuple[str, object]],
    *,
    backend: str = "auto",
    max_new_tokens: int = 64,
    chat: bool = False,
    batch_size: int = 1,
    on_result: Callable[[int, PromptResult], None] | None = None,
    notes: list[str] | None = None,
) -> list[PromptResult]:
    """Baseline and each recipe on every prompt, batch by batch (each recipe applied and removed
    around its own ``generate``, so the baseline is the untouched model). ``on_result`` is called
    with (index, result) as soon as a prompt's outputs are all in."""
    import attnsteer

    notes = notes if notes is not None else []
    device = next(model.parameters()).device
    results: list[PromptResult] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        inputs = build_inputs(tokenizer, batch, chat, device)
        mask = inputs.get("attention_mask")
        rows = [
            PromptResult(
                p,
                inputs["input_ids"][b].tolist(),
                int(mask[b].sum()) if mask is not None else inputs["input_ids"].shape[1],
            )
            for b, p in enumerate(batch)
        ]
        texts, counts, timing = timed_generate(model, tokenizer, inputs, max_new_tokens)
        for b, row in enumerate(rows):
            row.outputs[BASELINE] = Generation(BASELINE, texts[b], counts[b], timing)
        for label, recipe in recipes:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always", AttnsteerWarning)
                handle = attnsteer.apply(model, recipe, backend=backend)
                try:
                    texts, counts, timing = timed_generate(model, tokenizer, inputs, max_new_tokens)
                    sinks = handle.sinks()
                finally:
                    handle.remove()
            _collect_warnings(record, notes)
            for b, row in enumerate(rows):
                base = row.outputs[BASELINE].text
                row.outputs[label] = Generation(label, texts[b], counts[b], timing, same_as_baseline=texts[b] == base)
                if sinks:
                    row.sinks[label] = {layer: per_row[b] for layer, per_row in sinks.items()}
        for b, row in enumerate(rows):
            results.append(row)
            if on_result is not None:
                on_result(start + b, row)
    return results


# ---- rendering ----------------------------------------------------------------------------------
def format_timing(gen: Generation) -> str:
    t = gen.timing
    tps = t.decode_tps
    decode = f"{tps:6.1f} tok/s" if tps is not None else "     - tok/s"
    batch = f", batch of {t.batch}" if t.batch > 1 else ""
    return f"prefill {t.prefill_s * 1000:6.0f} ms | decode {decode} | {gen.new_tokens:3d} tokens in {t.total_s:5.2f} s{batch}"


def _evenly(items: list, k: int) -> list:
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else [items[0]]


def format_sinks(
    label: str, sinks: dict[int, dict[int, list[int]]], input_ids: list[int], tokenizer, act_params: dict | None = None
) -> list[str]:
    """A compact terminal summary of one prompt's ACT sink sets (one batch row)."""
    width = term_width()
    counts = {layer: sum(len(p) for p in heads.values()) for layer, heads in sorted(sinks.items())}
    total = sum(counts.values())
    n_heads = sum(len(heads) for heads in sinks.values())
    layers = sorted(counts)
    span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"

    def tok(pos: int) -> str:
        return token_text(tokenizer, input_ids[pos]) if 0 <= pos < len(input_ids) else "?"

    why = ""
    if act_params:
        why = (
            f" (keys taking > {act_params.get('threshold', 0.1):g} of their rows' attention, beyond each head's "
            f"first sink; ACT keeps {act_params.get('beta', 0.4):g} of their weight)"
        )
    lines = wrap(
        f"Hidden attention sinks found by ACT [{label}]: {total} in {n_heads} heads of {len(layers)} steered "
        f"{span}{why}",
        indent="",
        width=width,
    )
    if total == 0:
        lines.append("  none above the threshold for this prompt")
        return lines
    lines += wrap_items("sinks per layer: ", [f"L{l}:{c}" for l, c in counts.items()], width=width)
    freq = Counter(pos for heads in sinks.values() for ps in heads.values() for pos in ps)
    top = [f"{pos} {tok(pos)} x{n}" for pos, n in freq.most_common(SINK_TOP_POSITIONS)]
    lines += wrap_items("most frequent (position token x heads): ", top, width=width)
    shown: set[int] = set()
    for layer in _evenly([l for l in layers if counts[l]], SINK_DETAIL_LAYERS):
        parts = []
        for head, positions in sorted(sinks[layer].items()):
            head_pos = positions[:SINK_POSITIONS_PER_HEAD]
            shown.update(head_pos)
            more = f",+{len(positions) - len(head_pos)}" if len(positions) > len(head_pos) else ""
            parts.append(f"h{head} " + ",".join(map(str, head_pos)) + more)
        lines += wrap_items(f"layer {layer} ({counts[layer]}): ", parts, sep=" | ", width=width)
    legend = [f"{pos}={tok(pos)}" for pos in sorted(shown)]
    lines += wrap_items("tokens at those positions: ", legend, width=width)
    return lines


def format_result(
    index: int,
    total: int,
    result: PromptResult,
    tokenizer,
    *,
    chat: bool,
    act_params: dict[str, dict] | None = None,
    show_sinks: bool = True,
) -> str:
    width = term_width()
    head = f"=== Prompt {index + 1}/{total} "
    lines = [head + "=" * max(3, width - len(head))]
    lines += wrap(result.prompt, "", width)
    lines.append(f"({result.prompt_tokens} prompt tokens{' with the chat template' if chat else ''})")
    if show_sinks:
        for label, sinks in result.sinks.items():
            lines.append("")
            lines += format_sinks(label, sinks, result.input_ids, tokenizer, (act_params or {}).get(label))
    label_w = max(len(lbl) for lbl in result.outputs)
    for label, gen in result.outputs.items():
        lines.append("")
        same = "   (same text as baseline)" if gen.same_as_baseline else ""
        lines.append(f"[{label}]{' ' * (label_w - len(label))}  {format_timing(gen)}{same}")
        lines += wrap(gen.text or "(empty answer)", "  ", width)
    return "\n".join(lines)


def format_summary(results: list[PromptResult]) -> str:
    if not results:
        return ""
    labels = list(results[0].outputs)
    label_w = max(len(lbl) for lbl in labels + ["recipe"])
    lines = [
        f"{'recipe':<{label_w}}  {'prefill ms':>10}  {'decode tok/s':>12}  {'tokens':>6}  changed answers",
    ]
    for label in labels:
        gens = [r.outputs[label] for r in results]
        prefill = sum(g.timing.prefill_s for g in gens) / len(gens) * 1000
        tps = [g.timing.decode_tps for g in gens if g.timing.decode_tps is not None]
        tps_s = f"{sum(tps) / len(tps):12.1f}" if tps else f"{'-':>12}"
        tokens = sum(g.new_tokens for g in gens)
        changed = "-" if label == BASELINE else f"{sum(1 for g in gens if not g.same_as_baseline)}/{len(gens)}"
        lines.append(f"{label:<{label_w}}  {prefill:10.0f}  {tps_s}  {tokens:6d}  {changed}")
    return "\n".join(lines)


def act_params_of(recipes: list[tuple[str, object]]) -> dict[str, dict]:
    """label -> the parameters of the recipe's first ACT intervention (for the sink legend)."""
    out = {}
    for label, recipe in recipes:
        for iv in recipe.interventions:
            if iv.method == ACT.name:
                out[label] = dict(iv.params)
                break
    return out


def results_to_json(results: list[PromptResult]) -> list[dict]:
    rows = []
    for r in results:
        rows.append(
            {
                "prompt": r.prompt,
                "prompt_tokens": r.prompt_tokens,
                "outputs": {
                    label: {
                        "text": g.text,
                        "new_tokens": g.new_tokens,
                        "prefill_ms": round(g.timing.prefill_s * 1000, 3),
                        "decode_tokens_per_s": None if g.timing.decode_tps is None else round(g.timing.decode_tps, 3),
                        "total_s": round(g.timing.total_s, 4),
                        "batch": g.timing.batch,
                        "same_as_baseline": g.same_as_baseline,
                    }
                    for label, g in r.outputs.items()
                },
                "sinks": {
                    label: {str(layer): {str(h): p for h, p in heads.items()} for layer, heads in s.items()}
                    for label, s in r.sinks.items()
                },
            }
        )
    return rows


# ---- the demo -----------------------------------------------------------------------------------
def run_demo(
    prompts: list[str] | None = None,
    recipes: list[str] | None = None,
    *,
    max_new_tokens: int = DEMO_MAX_NEW_TOKENS,
    backend: str = "auto",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Offline tour on the embedded SmolLM2-135M-Instruct: ACT's hidden sinks, baseline vs steered
    answers and timings. Raises :class:`attnsteer.AttnsteerError` on a bad recipe."""
    with quiet_transformers():
        return _run_demo(prompts, recipes, max_new_tokens=max_new_tokens, backend=backend, out=out, err=err)


def _run_demo(prompts, recipes, *, max_new_tokens, backend, out, err) -> int:
    import attnsteer

    from . import models

    out = out or sys.stdout
    err = err or sys.stderr
    prompts = list(prompts or DEMO_PROMPTS)
    names = list(recipes or DEMO_RECIPES)
    loaded = label_recipes([(n, attnsteer.load_recipe(n)) for n in names])
    t_start = time.perf_counter()
    width = term_width()

    print("attnsteer demo: training-free attention steering on SmolLM2-135M-Instruct (offline)", file=out)
    print("=" * width, file=out, flush=True)
    tokenizer, model = load_with_progress(models.SMOLLM2_ID, err)
    load_s = time.perf_counter() - t_start
    chat = bool(getattr(tokenizer, "chat_template", None))
    print(f"model:   SmolLM2-135M-Instruct ({describe_model(model)})", file=out)
    for label, recipe in loaded:
        desc = one_line(recipe.description, 90) or ", ".join(recipe.methods)
        print(f"recipe:  {label}: {desc}", file=out)
    print(
        f"decode:  greedy, up to {max_new_tokens} new tokens, chat template {'on' if chat else 'off'}, "
        f"backend {backend}",
        file=out,
        flush=True,
    )

    # one short untimed run so the first timed prompt does not pay one-off start-up costs
    with torch.inference_mode():
        warm = build_inputs(tokenizer, prompts[:1], chat, next(model.parameters()).device)
        model.generate(**warm, generation_config=greedy_config(model, tokenizer, 2))

    act = act_params_of(loaded)
    notes: list[str] = []

    def show(i: int, result: PromptResult) -> None:
        print("", file=out)
        print(format_result(i, len(prompts), result, tokenizer, chat=chat, act_params=act), file=out, flush=True)

    results = run_prompts(
        model,
        tokenizer,
        prompts,
        loaded,
        backend=backend,
        max_new_tokens=max_new_tokens,
        chat=chat,
        on_result=show,
        notes=notes,
    )
    print("", file=out)
    print("=== Summary " + "=" * max(3, width - 12), file=out)
    print(format_summary(results), file=out)
    if not act:
        print("(no ACT intervention among the recipes, so no sinks to show)", file=out)
    for note in notes:
        print("", file=out)
        print("\n".join(wrap(f"note: {note}", "", width)), file=out)
    total = time.perf_counter() - t_start
    print("", file=out)
    print(f"Total {total:.1f} s (model load {load_s:.1f} s). Try your own prompt:", file=out)
    print(f'  attnsteer generate --model smollm2 --recipe {names[0]} --prompt "..."', file=out, flush=True)
    return 0
