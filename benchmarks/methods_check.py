"""Every registered method against the reference backend on 7B shapes with random weights (few layers).

    python benchmarks/methods_check.py --out DIR [--models llava-1.5-7b,llama-2-7b] [--layers 4]
        [--dtype bfloat16] [--backends auto,chunked] [--prompt-len 640] [--decode 4]

For each model (a built-in config of ``attnsteer eval speed``: real hidden size, heads and
vocabulary, ``num_hidden_layers`` cut to ``--layers``, random weights) and each method with a
recipe that fits a language model on random weights (the built-in where it fits; the timing
recipes of recipes/timing/ where the paper thresholds find nothing on random weights; AGLA needs a
vision-language model and its processor and is skipped), one left-padded batch of two prompts
(image placeholders, or for a text model a span of tokens, marked with ``handle.focus``) is run
through prefill and ``--decode`` teacher-forced decode steps with the KV cache:

* the unsteered model and the recipe on each ``--backends`` entry and on ``reference``, in ``--dtype``;
* the float32 truth: the same weights in float32 with the recipe on ``reference``.

Logits are compared over the real (non-padding) positions. A backend passes when its error
against the float32 truth is within twice the error of ``reference`` in ``--dtype`` (how the
papers' code runs: eager attention) plus 1e-3 -- the suite's dtype rule, at model level. The
steering effect (float32 truth steered vs unsteered) is reported next to it, flagged when it is
below the dtype's own noise (then the comparison says little). Each backend's paths and fallbacks
(``handle.stats()``, the self-check's included) are recorded. Writes DIR/methods.json and
DIR/methods.md; prints the table; exit code 1 if a comparison failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# method -> recipe: built-in names, or timing recipes (lowered thresholds for random weights)
RECIPES = {
    "act": str(REPO / "recipes/timing/act-timing.yaml"),
    "softplus": "softplus-reweight",
    "var": str(REPO / "recipes/timing/var-timing.yaml"),
    "vhr": str(REPO / "recipes/timing/vhr-timing.yaml"),
    "pai": "pai-llava15",
    # the newer methods with their published parameters, on every layer but the first (the built-ins
    # name LLaVA-1.5-7B's middle layers, which a model cut to a few layers does not have)
    "vaf": {
        "name": "vaf-cut",
        "interventions": [{"method": "vaf", "layers": "1:", "params": {"alpha": 1.15, "beta": 0.95}}],
    },
    "hgai": {"name": "hgai-cut", "interventions": [{"method": "hgai", "layers": "1:", "params": {"alpha": 0.5}}]},
    "spin": {
        "name": "spin-cut",
        "interventions": [{"method": "spin", "layers": "1:", "params": {"rho": 0.8, "eps": 0.1}}],
    },
    "seka": "random projections",  # built for the model by seka_recipe()
}
SKIP = {"agla": "needs a vision-language model and its image processor (it builds augmented image views)"}
ORDER = ("act", "softplus", "var", "vhr", "pai", "agla", "vaf", "hgai", "spin", "seka")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def seka_recipe(model, folder: Path) -> dict:
    """A SEKA recipe on every layer but the first with random rank-8 projections for ``model``
    (the check compares backends, not projections), its file written into ``folder``."""
    from attnsteer import archs
    from attnsteer.methods.seka import Projections, _model_facts
    from attnsteer.recipe import file_sha256

    arch = archs.resolve(model)
    g = torch.Generator().manual_seed(0)
    pos, neg = {}, {}
    for layer in range(1, arch.num_layers):
        basis = torch.linalg.qr(torch.randn(arch.num_kv_heads, arch.head_dim, 8, generator=g))[0]
        pos[layer] = basis @ basis.transpose(-1, -2)
        neg[layer] = torch.eye(arch.head_dim) - pos[layer]
    meta = {**_model_facts(arch), "projected": {str(l): list(range(arch.num_kv_heads)) for l in pos}}
    file = Projections(pos, neg, meta).save(folder / "seka-random.safetensors")
    params = {"g_pos": 0.8, "g_neg": 0.2, "projections": {"path": str(file), "sha256": file_sha256(file)}}
    return {"name": "seka-random", "interventions": [{"method": "seka", "layers": "1:", "params": params}]}


def recipe_for(name: str, model=None, folder: Path | None = None):
    """(recipe dict without model_types, where it came from) for method ``name``, or (None, why)."""
    import attnsteer

    source = RECIPES.get(name)
    if name == "seka" and model is not None and folder is not None:
        return seka_recipe(model, folder), source
    if isinstance(source, dict):
        return source, source["name"]
    if source is None:  # a newer method: its first built-in recipe
        folder = Path(attnsteer.__file__).parent / "recipes"
        found = sorted(p.stem for p in folder.glob(f"{name}-*.yaml"))
        if not found:
            return None, f"no built-in recipe named {name}-*"
        source = found[0]
    data = attnsteer.load_recipe(source).to_dict()
    data.pop("model_types", None)
    data.pop("model_types_policy", None)
    return data, Path(source).name if "/" in source else source


def prompts(config, info, length: int, pads: tuple[int, ...], focus_len: int, seed: int, device):
    """(ids (B, L), attention_mask, focus bool (B, L)): ``length`` columns, row b left-padded by
    pads[b]; the focus span (image placeholders of a VLM config, else ordinary tokens) right after
    each row's first token."""
    from attnsteer.speed.models import build_prompt

    image = info.get("image_tokens") or 0
    span = min(image or focus_len, length - max(pads) - 2)
    base = build_prompt(config, len(pads), length, span if image else 0, info.get("image_token_id"), seed, device)
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    ids = torch.full_like(base, pad_id)
    mask = torch.zeros_like(base)
    focus = torch.zeros_like(base, dtype=torch.bool)
    for b, pad in enumerate(pads):
        ids[b, pad:] = base[b, : length - pad]
        mask[b, pad:] = 1
        focus[b, pad + 1 : pad + 1 + span] = True
    return ids, mask, focus


def run(model, recipe, backend: str, ids, mask, focus, steps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits (float32) of the prefill's real positions and of each teacher-forced decode step,
    concatenated; with the handle's paths, fallbacks and steered rows."""
    import attnsteer
    from attnsteer import compat

    handle = attnsteer.apply(model, recipe, backend=backend) if recipe is not None else None
    info: dict = {"paths": {}, "fallbacks": {}, "rows": 0, "warnings": []}
    try:
        focused = handle.focus(focus) if handle is not None else contextlib.nullcontext()
        with torch.inference_mode(), focused:
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            parts = [out.logits.float()[mask.bool()]]  # (real tokens, V)
            cache = compat.output_cache(out)
            del out
            for i in range(steps.shape[1]):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(input_ids=steps[:, i : i + 1], attention_mask=mask, use_cache=True,
                            **compat.with_cache(model, cache))  # fmt: skip
                parts.append(out.logits[:, -1].float())
                cache = compat.output_cache(out)
                del out
            del cache
    finally:
        if handle is not None:
            stats = handle.stats()
            for site in {s["layer"]: s for s in stats}.values():
                for key, n in site["paths"].items():
                    info["paths"][key] = info["paths"].get(key, 0) + n
                for key, n in site["fallbacks"].items():
                    info["fallbacks"][key] = info["fallbacks"].get(key, 0) + n
            info["rows"] = int(sum(int(s["rows_modified"]) for s in stats))
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                handle.remove()
            info["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in record})
    return torch.cat(parts), info


def check_model(name: str, args, device, dtype) -> list[dict]:
    from attnsteer.methods import METHODS
    from attnsteer.speed.models import build_model, resolve_config

    config, info = resolve_config(name, [f"num_hidden_layers={args.layers}"])
    t0 = time.perf_counter()
    model = build_model(config, name, True, dtype, device)
    gold_model = copy.deepcopy(model).float()
    build_s = time.perf_counter() - t0
    length = args.prompt_len or (info.get("prompt_len") if info.get("image_tokens") else 512)
    ids, mask, focus = prompts(config, info, length, (0, 5), args.focus_len, args.seed, device)
    g = torch.Generator().manual_seed(args.seed + 1)
    steps = torch.randint(3, min(int(config.vocab_size), 32000), (ids.shape[0], args.decode), generator=g).to(device)
    plain, _ = run(model, None, "auto", ids, mask, focus, steps)
    plain_gold, _ = run(gold_model, None, "reference", ids, mask, focus, steps)
    rows = []
    for method in ORDER:
        row = {"model": name, "layers": args.layers, "method": method, "dtype": args.dtype, "build_s": build_s}
        if method not in METHODS:
            rows.append(dict(row, status="skipped", note="not in this checkout's method registry"))
            continue
        if method in SKIP:
            rows.append(dict(row, status="skipped", note=SKIP[method]))
            continue
        recipe, source = recipe_for(method, model, Path(args.out))
        row["recipe"] = source
        if recipe is None:
            rows.append(dict(row, status="skipped", note=source))
            continue
        t1 = time.perf_counter()
        try:
            gold, gold_info = run(gold_model, recipe, "reference", ids, mask, focus, steps)
            ref, ref_info = run(model, recipe, "reference", ids, mask, focus, steps)
            outs = {b: run(model, recipe, b, ids, mask, focus, steps) for b in args.backends}
        except Exception as exc:  # a recipe that cannot run here is reported, the others go on
            rows.append(dict(row, status="error", note=f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"))
            continue
        scale = float(gold.abs().max())
        effect = float((gold - plain_gold).abs().max())
        ref_err = float((ref - gold).abs().max())
        row.update(
            logits_max=scale,
            effect=effect,
            reference_error=ref_err,
            reference_rows=ref_info["rows"],
            warnings=sorted(set(gold_info["warnings"] + ref_info["warnings"])),
            unsteered_bf16_error=float((plain - plain_gold).abs().max()),
        )
        status = "pass"
        for backend, (out, info_b) in outs.items():
            err = float((out - gold).abs().max())
            tol = 2 * ref_err + 1e-3
            ok = err <= tol
            status = status if ok else "FAIL"
            row[backend] = {
                "error": err,
                "tolerance": tol,
                "ok": ok,
                "vs_reference": float((out - ref).abs().max()),
                "paths": info_b["paths"],
                "fallbacks": info_b["fallbacks"],
                "rows": info_b["rows"],
                "warnings": info_b["warnings"],
            }
        if effect <= 1e-3:
            status += " (no effect)"
        elif effect <= ref_err:
            status += " (effect below dtype noise)"
        row.update(status=status, seconds=time.perf_counter() - t1)
        rows.append(row)
        print(f"{name} {method}: {status} ({row['seconds']:.1f} s)", flush=True)
    del model, gold_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], backends: list[str], header: str) -> str:
    cols = ["model", "method", "recipe", "status", "effect", "ref err"]
    for b in backends:
        cols += [f"{b} err", f"{b} tol", f"{b} ran on", f"{b} fallbacks"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def num(x):
        return "" if x is None else f"{x:.3g}"

    for r in rows:
        cells = [
            r["model"],
            r["method"],
            r.get("recipe", ""),
            r["status"] + (f": {r['note']}" if r.get("note") else ""),
        ]
        cells += [num(r.get("effect")), num(r.get("reference_error"))]
        for b in backends:
            res = r.get(b) or {}
            paths = ", ".join(f"{k} x{v}" for k, v in sorted(res.get("paths", {}).items()))
            falls = "; ".join(f"{k} x{v}" for k, v in sorted(res.get("fallbacks", {}).items()))
            cells += [num(res.get("error")), num(res.get("tolerance")), paths, falls]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="llava-1.5-7b,llama-2-7b")
    parser.add_argument("--layers", type=int, default=4, help="num_hidden_layers of each model (real width)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--backends", default="auto,chunked", help="compared with reference (comma-separated)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 640 for VLM shapes, else 512")
    parser.add_argument("--focus-len", type=int, default=64, help="focus tokens of a text model's prompt")
    parser.add_argument("--decode", type=int, default=4, help="teacher-forced decode steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            rows += check_model(name, args, device, dtype)
        except Exception as exc:
            rows.append({"model": name, "method": "*", "status": "error", "note": f"{type(exc).__name__}: {exc}"})
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (
        f"# Methods against the reference on {gpu} ({args.dtype}, {args.layers} layers, random weights)\n\n"
        f"{time.perf_counter() - t0:.0f} s. err: max |logits - float32 reference truth| over the real prefill "
        "positions and the decode steps; tol: 2 x the reference backend's error in this dtype + 1e-3; effect: "
        "max |steered - unsteered| of the float32 truth."
    )
    (out / "methods.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str) + "\n")
    table = markdown(rows, args.backends, header)
    (out / "methods.md").write_text(table)
    print(table)
    return 1 if any(r["status"].startswith(("FAIL", "error")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
