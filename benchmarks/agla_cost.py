"""AGLA's cost per generated token against the unsteered model, and the matcher's one-off cost.

Random weights, CPU or CUDA, float32 unless --dtype. Two models: the tiny test LLaVA and a
LLaVA-1.5-7B config (CLIP ViT-L/14-336, 576 image tokens, Llama-2-7B width) with reduced depth
(--text-layers / --vision-layers). For each: greedy generate of --new-tokens tokens for one
prompt, unsteered and with AGLA (lvlm_attention: own caches; share_cache), best of --repeats;
cost per token = (total - prefill) / new tokens, prefill timed as a 1-token generate. The
blip_itm matcher (a random BLIP ITM-large-shaped model, 384 px, 12-layer text encoder) is timed
separately: one relevance() call (ITC forward + ITM forward and backward).

    python benchmarks/agla_cost.py --out evals/agla/cpu_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import attnsteer


class ImageProcessor:
    image_mean = (0.48145466, 0.4578275, 0.40821073)
    image_std = (0.26862954, 0.26130258, 0.27577711)


def llava(text_layers: int, vision_layers: int, full: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if full:  # LLaVA-1.5-7B widths
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)  # fmt: skip
        seq = 576
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=4, projection_dim=32)  # fmt: skip
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=136)  # fmt: skip
        seq = 16
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 8,
                         image_seq_length=seq, vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    ids = [1] + [5, 6, 7] + [config.image_token_index] * seq + list(range(10, 40))
    side = vision.image_size
    inputs = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(1, 3, side, side),
    }
    return model, inputs


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(model, inputs, new_tokens, repeats):
    def gen(n):
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    out = {}
    recipes = {
        "unsteered": None,
        "agla lvlm_attention": {"interventions": [{"method": "agla", "params": {"matcher": "lvlm_attention"}}]},
        "agla lvlm_attention share_cache": {
            "interventions": [{"method": "agla", "params": {"matcher": "lvlm_attention", "share_cache": True}}]
        },
    }
    for label, recipe in recipes.items():
        handle = None if recipe is None else attnsteer.apply(model, recipe, processor=ImageProcessor())
        try:
            gen(2)  # warm-up
            prefill = timed(lambda: gen(1), repeats)
            total = timed(lambda: gen(new_tokens + 1), repeats)
        finally:
            if handle is not None:
                handle.remove()
        out[label] = {"prefill_s": round(prefill, 4), "per_token_ms": round(1000 * (total - prefill) / new_tokens, 3)}
    base = out["unsteered"]
    for row in out.values():
        row["per_token_vs_unsteered"] = round(row["per_token_ms"] / base["per_token_ms"], 3)
        row["prefill_vs_unsteered"] = round(row["prefill_s"] / base["prefill_s"], 3)
    return out


def blip_cost(repeats):
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from attnsteer.methods.agla_matchers import BlipItmMatcher

    text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, encoder_hidden_size=1024)  # fmt: skip
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=384, patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=256))

    class Tok:
        def __call__(self, texts, **kw):
            n = 12
            return {
                "input_ids": torch.randint(1000, 2000, (len(texts), n)),
                "attention_mask": torch.ones(len(texts), n, dtype=torch.long),
            }

        def get_vocab(self):
            return {"[ENC]": 30523}

    class Proc:
        image_processor = type("P", (), {"size": {"height": 384, "width": 384}, "image_mean": ImageProcessor.image_mean,
                                         "image_std": ImageProcessor.image_std})()  # fmt: skip
        tokenizer = Tok()

    matcher = BlipItmMatcher(model=model, processor=Proc())
    images = torch.rand(1, 3, 336, 336)
    matcher.relevance(images, ["is there a dog in the image"], "cpu", torch.float32)  # warm-up
    return {
        "relevance_s": round(
            timed(lambda: matcher.relevance(images, ["is there a dog"], "cpu", torch.float32), repeats), 3
        )
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },  # fmt: skip
        "new_tokens": args.new_tokens,
        "tiny_llava": measure(*llava(0, 0, False), args.new_tokens, args.repeats),
        f"llava15_7b_widths_{args.text_layers}_text_{args.vision_layers}_vision_layers": measure(
            *llava(args.text_layers, args.vision_layers, True), args.new_tokens, args.repeats
        ),
        "blip_itm_large_matcher_one_off": blip_cost(args.repeats),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
