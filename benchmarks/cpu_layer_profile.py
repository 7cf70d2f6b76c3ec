"""Where a steered layer's time goes on CPU: a torch.profiler breakdown of one attention call.

Runs the embedded SmolLM2-135M-Instruct on a random prompt with each recipe, captures the
(query, key, value) one steered layer's attention function receives at prefill (and at one decode
step), then profiles that call on the fused backend's CPU path (PyTorch's flash kernel +
corrections) next to the model's own SDPA on the same tensors. Writes
``<out>/layer_profile_n<len>.json`` and ``.md``: per configuration the median wall time and the
aten ops by self CPU time.

    .venv/bin/python benchmarks/cpu_layer_profile.py --prompt-len 2048 --layer 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import attnsteer
from attnsteer.attention import dispatch, router
from attnsteer.attention.geometry import AttentionCall, MaskView
from attnsteer.models import load_smollm2


def capture(model, recipe, ids, layer: int) -> dict:
    """The arguments of ``layer``'s steered attention call at prefill and at the first decode step,
    and its LayerSite (recorded by standing in for the site in the dispatch table)."""
    seen = {}
    with attnsteer.apply(model, recipe):
        module = model.model.layers[layer].self_attn
        site = dispatch._SITES[module]

        def record(mod, query, key, value, attention_mask, **kwargs):
            phase = "prefill" if query.shape[2] > 1 else "decode"
            if phase not in seen:
                info = site.state.info_for(site.layer, query, key)
                seen[phase] = dict(query=query.clone(), key=key.clone(), value=value.clone(), mask=attention_mask)
                seen[phase]["info"] = info
            return site(mod, query, key, value, attention_mask, **kwargs)

        dispatch._SITES[module] = record
        try:
            with torch.no_grad():
                out = model(ids, use_cache=True, logits_to_keep=1)
                model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        finally:
            dispatch._SITES[module] = site
    seen["site"] = site
    return seen


def time_and_profile(fn, repeats: int) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    top = [
        {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
        for e in ops[:8]
    ]
    return {"median_ms": statistics.median(times) * 1e3, "ops": top}


def profile_call(site, call: dict, repeats: int) -> dict | None:
    """The captured call on the fused backend vs the model's own SDPA on the same tensors."""
    q, k, v, info = call["query"], call["key"], call["value"], call["info"]
    steps = site.plan.steps(info.is_prefill)
    if not steps.attention:
        return None
    scaling = q.shape[-1] ** -0.5
    mask = MaskView(call["mask"], q.shape[2], k.shape[2])
    attention_call = AttentionCall(site.layer, info, q, k, mask, scaling, site.state.prompt)

    def steered():
        site.stats.begin({rule.method for rule in steps.weight})
        router.run(site.config, steps, attention_call, q, k, v, site.stats)
        site.stats.end()

    def own():
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=q.shape[2] > 1, scale=scaling, enable_gqa=True
        )

    return {
        "steered": time_and_profile(steered, repeats),
        "sdpa": time_and_profile(own, repeats),
        "shape": {"q": list(q.shape), "k": list(k.shape)},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--recipe", action="append", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="evals/speed/cpu")
    args = parser.parse_args(argv)
    recipes = args.recipe or ["act-default", "softplus-reweight"]
    _, model = load_smollm2()
    ids = torch.randint(100, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    results = {}
    for recipe in recipes:
        seen = capture(model, recipe, ids, args.layer)
        site = seen["site"]
        for phase in ("prefill", "decode"):
            call = seen.get(phase)
            if call is None:
                continue
            result = profile_call(site, call, args.repeats)
            if result is not None:
                results[f"{recipe}/{phase}"] = result
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"layer_profile_n{args.prompt_len}"
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "layer": args.layer,
        "prompt_len": args.prompt_len,
        "command": "python benchmarks/cpu_layer_profile.py " + " ".join(argv or []),
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"# One steered attention call of SmolLM2 layer {args.layer}, {args.prompt_len}-token prompt ({meta['cpu']}, "
        f"{meta['threads']} threads, torch {meta['torch']})",
        "",
        "Medians of the call alone (the model's own SDPA on the same tensors for comparison), and the aten ops "
        "by self CPU time in one profiled call.",
        "",
    ]
    for name, r in results.items():
        ratio = r["steered"]["median_ms"] / r["sdpa"]["median_ms"]
        lines += [
            f"## {name}: {r['steered']['median_ms']:.2f} ms steered vs {r['sdpa']['median_ms']:.2f} ms SDPA "
            f"({ratio:.2f}x), q {r['shape']['q']}, k {r['shape']['k']}",
            "",
            "| op | calls | self ms | share |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {o['op']} | {o['calls']} | {o['self_ms']:.2f} | {o['share']:.0%} |" for o in r["steered"]["ops"]]
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
