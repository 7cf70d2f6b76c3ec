"""Helpers for the eval-harness tests (no tests here): a tiny LLaVA saved with a real processor,
synthetic COCO-style images, POPE question files, CHAIR ground truth and a synonym list -- all
built in code, offline.

The model is ``tests/vlm_fixtures.build_vlm("llava")`` when that module is there (tiny CLIP vision +
tiny Llama text, image placeholder id 128, 16 placeholders per 16x16 image); the processor is a
``LlavaProcessor`` around a word-level tokenizer whose ids fit that model's vocabulary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WORDS = """user assistant : . , ? ! is there a an the in image please answer this question with one word yes no not
describe detail of and on sitting standing red blue green man woman people person dog cat car chair table bus
truck bird horse sheep cow elephant bear zebra giraffe bench boat train bicycle umbrella cup bottle pizza cake
bed couch tv laptop phone book clock vase kite frisbee bowl banana apple sandwich orange broccoli carrot
plate street road tree sky grass water field room kitchen window door wall large small two three some
near next to front behind its his her white black brown parked""".split()

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)

# COCO val2014 ids used by the synthetic data (a few from the published CHAIR / POPE lists)
IMAGE_IDS = [2239, 3845, 4108, 4677, 5294, 6040, 6471, 7320]
SYNONYMS = [
    "person, man, woman, people, girl, boy",
    "dog, puppy",
    "cat, kitten",
    "car",
    "chair",
    "dining table, table",
    "bus",
    "truck",
    "bird",
    "horse",
    "umbrella",
    "cup",
    "pizza",
    "laptop",
    "tv",
    "book",
    "clock",
    "bench",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [w for w in dict.fromkeys(WORDS) if w not in specials][: 128 - len(specials)]
    vocab = {w: i for i, w in enumerate(specials + words)}
    for i in range(len(vocab), 128):
        vocab[f"w{i}"] = i
    vocab["<image>"] = 128
    for i in range(129, 136):
        vocab[f"<extra{i}>"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor():
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava():
    try:
        from vlm_fixtures import build_vlm

        return build_vlm("llava", seed=0)
    except ImportError:  # pragma: no cover - fallback when the shared fixture module is absent
        import torch
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
            vocab_size=136,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=128,
            image_seq_length=16,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(cfg).eval()


def save_tiny_llava(folder: Path) -> Path:
    model = build_tiny_llava()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.save_pretrained(folder)
    build_processor().save_pretrained(folder)
    return folder


def coco_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_images(folder: Path, ids=IMAGE_IDS) -> Path:
    """Synthetic COCO-style JPEGs (random noise with a coloured block, 20x24 pixels)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, image_id in enumerate(ids):
        rng = np.random.RandomState(image_id)
        arr = rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)
        arr[4:12, 6:16] = [(40 * k) % 255, 200, 90]
        Image.fromarray(arr).save(folder / coco_name(image_id), quality=90)
    return folder


def write_pope(folder: Path, ids=IMAGE_IDS[:4], objects=("dog", "car", "chair")) -> Path:
    """coco_pope_<split>.json files (JSON Lines), 2 questions per image (a yes and a no)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(("random", "popular", "adversarial")):
        lines, qid = [], 1
        for k, image_id in enumerate(ids):
            for label, obj in (("yes", objects[(k + s) % 3]), ("no", objects[(k + s + 1) % 3])):
                lines.append(
                    json.dumps(
                        {
                            "question_id": qid,
                            "image": coco_name(image_id),
                            "text": f"Is there a {obj} in the image?",
                            "label": label,
                        }
                    )
                )
                qid += 1
        (folder / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return folder


def write_chair_files(folder: Path, ids=IMAGE_IDS) -> tuple[Path, Path]:
    """(synonyms.txt, gt.json) for the synthetic images."""
    folder.mkdir(parents=True, exist_ok=True)
    syn = folder / "synonyms.txt"
    syn.write_text("\n".join(SYNONYMS) + "\n")
    cats = [line.split(", ")[0] for line in SYNONYMS]
    gt = {str(i): sorted({cats[i % len(cats)], cats[(i // 7) % len(cats)]}) for i in ids}
    gt_path = folder / "gt.json"
    gt_path.write_text(json.dumps({"objects": gt}))
    return syn, gt_path


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval-data")
    images = write_images(root / "val2014")
    pope = write_pope(root / "pope")
    syn, gt = write_chair_files(root / "chair")
    return {"root": root, "images": images, "pope": pope, "synonyms": syn, "gt": gt}


def run_cli(*argv, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m attnsteer.cli ARGV`` in a fresh process."""
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "attnsteer.cli", *map(str, argv)],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_samples(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())
