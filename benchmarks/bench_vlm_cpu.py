"""CPU cost of the vision-language methods (VAR, PAI, VHR) against the unsteered model.

Two LLaVA models with random weights, built from configs in code (nothing downloaded):

* ``tiny``: CLIP 16 px / patch 4 (16 image tokens) + a 4-layer, 64-wide Llama; 16 + 32 tokens.
* ``llava-1.5-7b``: the LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 -> 576 image tokens; Llama-2-7B
  text: hidden 4096, 32 heads, MLP 11008, vocab 32064) at reduced depth (``--text-layers``, default
  2; vision 2 layers); 576 image + 64 text tokens.

For each model, one process alternates the baseline (SDPA) and every (recipe, backend) pair:
prefill latency (median of ``--repeats``), decode tokens/s over ``--new-tokens`` greedy steps
with the KV cache (manual ``model(...)`` calls, so the steering hooks see every step), and, in a
fresh subprocess per configuration, the peak extra resident memory of one prefill + decode
(VmHWM reset through /proc/self/clear_refs, see bench_cpu.py). Random weights have no massive
activations, so VAR runs with ``tau 3.5`` (sinks do exist at that level) -- the cost is what is
measured here, not the effect.

    python benchmarks/bench_vlm_cpu.py --models tiny llava-1.5-7b --output benchmarks/results/cpu_vlm
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import machine_info, malloc_trim, proc_status, reset_hwm  # noqa: E402

import attnsteer  # noqa: E402
from attnsteer import compat  # noqa: E402

IMAGE_TOKEN = 32000
RECIPES = {
    # layers "all": the reduced-depth 7B config has too few layers for the default layers ("2:-1", "2:")
    "var": {
        "name": "var",
        "interventions": [
            {"method": "var", "layers": "all", "params": {"tau": 3.5, "rho": 0.3, "min_image_attention": 0.05}}
        ],
    },
    "pai": {"name": "pai", "interventions": [{"method": "pai", "layers": "all", "params": {"alpha": 0.5}}]},
    "pai+gamma": {
        "name": "pai+gamma",
        "interventions": [{"method": "pai", "layers": "all", "params": {"alpha": 0.5, "gamma": 1.1}}],
    },
    "vhr": {"name": "vhr", "interventions": [{"method": "vhr", "layers": "all"}]},
}


def build(model_name: str, text_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if model_name == "tiny":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        )
        image_tokens, text_tokens, side = 16, 32, 16
    else:
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=2,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=text_layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        )
        image_tokens, text_tokens, side = 576, 64, 336
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = [1] + [IMAGE_TOKEN] * image_tokens + torch.randint(3, 32000, (text_tokens - 1,), generator=g).tolist()
    inputs = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(1, 3, side, side, generator=g),
    }
    return model, inputs


@torch.no_grad()
def run_once(model, inputs, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy generation with the KV cache."""
    start = time.perf_counter()
    out = model(**inputs, use_cache=True)
    prefill = time.perf_counter() - start
    cache, mask = compat.output_cache(out), inputs["attention_mask"]
    nxt = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **compat.with_cache(model, cache))
        cache, nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)
    return prefill, new_tokens / (time.perf_counter() - start)


def configs():
    yield "baseline", None, None
    for name in RECIPES:
        for backend in ("fused", "reference"):
            yield f"{name}/{backend}", name, backend


def time_worker(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, inputs = build(args.model, args.text_layers)
    run_once(model, inputs, 2)  # warm-up
    samples: dict[str, list] = {label: [] for label, _, _ in configs()}
    for _ in range(args.repeats):  # alternate: one round over every configuration per repeat
        for label, recipe, backend in configs():
            if recipe is None:
                samples[label].append(run_once(model, inputs, args.new_tokens))
            else:
                with attnsteer.apply(model, RECIPES[recipe], backend=backend):
                    samples[label].append(run_once(model, inputs, args.new_tokens))
    return [
        {
            "config": label,
            "prefill_s": statistics.median(p for p, _ in s),
            "decode_tok_s": statistics.median(d for _, d in s),
        }
        for label, s in samples.items()
    ]


def mem_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model, inputs = build(args.model, args.text_layers)
    run_once(model, inputs, 1)
    recipe, backend = args.recipe, args.backend
    handle = attnsteer.apply(model, RECIPES[recipe], backend=backend) if recipe else None
    malloc_trim()
    before = proc_status()
    reset_hwm()
    run_once(model, inputs, args.new_tokens)
    after = proc_status()
    if handle:
        handle.remove()
    return {"peak_extra_mib": (after["VmHWM"] - before["VmRSS"]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "llava-1.5-7b"], choices=["tiny", "llava-1.5-7b"])
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(__import__("os").sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/cpu_vlm"))
    parser.add_argument("--_worker", choices=["time", "mem"])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--recipe")
    parser.add_argument("--backend")
    args = parser.parse_args()
    if args._worker:
        result = time_worker(args) if args._worker == "time" else mem_worker(args)
        print("RESULT " + json.dumps(result))
        return

    def worker(mode, model, extra=()):
        cmd = [
            sys.executable,
            __file__,
            "--_worker",
            mode,
            "--model",
            model,
            "--text-layers",
            str(args.text_layers),
            "--new-tokens",
            str(args.new_tokens),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            *extra,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])

    rows = []
    for model in args.models:
        print(f"[{model}] timing (alternating, {args.repeats} rounds) ...", flush=True)
        timed = {r["config"]: r for r in worker("time", model)}
        for label, recipe, backend in configs():
            extra = ["--recipe", recipe, "--backend", backend] if recipe else []
            mem = worker("mem", model, extra)
            rows.append({"model": model, **timed[label], **mem})
            print(
                f"  {label:22s} prefill {timed[label]['prefill_s']:.3f} s  decode {timed[label]['decode_tok_s']:.2f} tok/s  "
                f"peak extra {mem['peak_extra_mib']:.0f} MiB",
                flush=True,
            )
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["config"] == "baseline")
        row["prefill_ratio"] = row["prefill_s"] / base["prefill_s"]
        row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["mem_ratio"] = row["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)
    meta = {
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("_")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    lines = [
        f"# VLM steering cost on CPU ({meta['machine']['cpu_model']}, {args.threads} threads, torch {meta['machine']['torch']}, "
        f"transformers {meta['machine']['transformers']}, git {meta['machine']['git'][:12]})",
        "",
        f"Command: `python benchmarks/bench_vlm_cpu.py --models {' '.join(args.models)} --text-layers {args.text_layers} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats}`; {meta['date']}.",
        "",
        "| model | config | prefill s | decode tok/s | peak extra MiB | prefill x base | decode x base | memory x base |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['config']} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.2f} | {r['peak_extra_mib']:.0f} | "
            f"{r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | {r['mem_ratio']:.2f} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
