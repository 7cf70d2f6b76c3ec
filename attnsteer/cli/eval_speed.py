"""``attnsteer eval speed``: prefill latency, decode tokens/s and peak memory of recipes against
the unsteered model. Maps the flags to a :class:`~attnsteer.speed.SpeedConfig`, runs
:func:`attnsteer.speed.measure` and prints its tables, the files written and the notes."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..speed.config import BACKEND_CHOICES, DEFAULT_OUTPUT, DTYPES, SpeedConfig
from ..speed.models import BUILTIN_CONFIGS
from ._args import nonnegative_int, positive_int

EXIT_OK = 0
EXIT_FAILED = 1  # every configuration of a prompt length failed (out of memory, unsupported backend)

HELP = "prefill latency, decode tokens/s and peak memory: unsteered model vs recipes"
DESCRIPTION = (
    "Time the unsteered model (its own SDPA attention) against each recipe in one process, alternating runs: "
    "prefill latency, decode tokens/s, peak memory and their ratios, plus the reference (eager) backend. "
    "--random-weights builds the model from its config, so 7B shapes (built-in: llava-1.5-7b, llama-2-7b) need no "
    "weight download. Writes CSV, JSON, Markdown and a PNG chart to --output_path."
)
NEEDS = "about 14 GB of memory for the 7B config's random weights; a GPU, or a long CPU run"
EXAMPLE = (
    "attnsteer eval speed --model llava-1.5-7b --random-weights --recipe act-default --recipe softplus-reweight "
    "--batch_size 1 --new-tokens 128 --dtype bfloat16"
)


def prompt_lengths(text: str) -> list[int]:
    """``"512,2048"`` -> [512, 2048] (argparse type of --prompt-len)."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected prompt lengths like 512 or 512,2048, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one prompt length, got {text!r}")
    return list(dict.fromkeys(values))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``attnsteer eval speed`` (lm-eval-style underscores, dashed aliases accepted)."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"smollm2 (the embedded SmolLM2-135M-Instruct, real weights, offline), a built-in config name "
        f"({', '.join(BUILTIN_CONFIGS)}), a local config.json or model folder, or a hub id (with --random-weights "
        "only its config is downloaded)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        metavar="RECIPE",
        help="recipe name, YAML path or hub repo; repeat for several",
    )
    parser.add_argument(
        "--random-weights",
        "--random_weights",
        dest="random_weights",
        action="store_true",
        help="build the model from its config with random weights (no weight download)",
    )
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=positive_int, default=1)
    parser.add_argument(
        "--prompt-len",
        "--prompt_len",
        dest="prompt_len",
        type=prompt_lengths,
        default=None,
        help="prompt tokens; a comma-separated list sweeps the lengths (one result file set per length; default: "
        "the built-in config's, e.g. 640 = 576 + 64 for llava-1.5-7b; 512 otherwise)",
    )
    parser.add_argument(
        "--memory",
        choices=("in-process", "fresh-process"),
        default="in-process",
        help="peak memory: in the timing process (default), or also in a fresh process per (length, "
        "configuration) with the resident high-water mark reset after warm-up -- what the run itself needs, "
        "free of allocator reuse (Linux; one model load per configuration)",
    )
    parser.add_argument(
        "--new-tokens",
        "--new_tokens",
        dest="new_tokens",
        type=positive_int,
        default=128,
        help="greedy decode steps after the prefill",
    )
    parser.add_argument(
        "--image-tokens",
        "--image_tokens",
        dest="image_tokens",
        type=nonnegative_int,
        default=None,
        help="image-placeholder tokens at the start of the prompt (default: 576 for llava-1.5-7b, "
        "else 0); they are ordinary token ids for the timed language model",
    )
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a (text) config field, e.g. --override num_hidden_layers=4",
    )
    parser.add_argument(
        "--backends",
        default="auto,reference",
        help=f"comma-separated backends per recipe, from {', '.join(BACKEND_CHOICES)} (default: auto,reference)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed (baseline, steered) pairs per recipe")
    parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed runs per configuration first")
    parser.add_argument(
        "--output_path",
        "--output-path",
        dest="output_path",
        default=DEFAULT_OUTPUT,
        help="folder for the CSV / JSON / Markdown / PNG results",
    )
    parser.add_argument("--label", default=None, help="name for this run in file names (default: from the flags)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    parser.add_argument("--no-plot", "--no_plot", dest="no_plot", action="store_true", help="skip the PNG chart")
    return parser


def config_of(args: argparse.Namespace) -> SpeedConfig:
    """The :class:`SpeedConfig` of the parsed flags (every field is a flag; ``--recipe`` is not a field)."""
    return SpeedConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SpeedConfig)})


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the measurement; print each prompt length's table and files. Exit code 0, or 1 when
    every configuration of a prompt length failed; a usage error propagates (exit code 2)."""
    from ..speed import measure
    from ..speed.report import markdown

    records = measure(None, args.recipe, config_of(args), progress=_log)
    status = EXIT_OK
    for record in records:
        meta = record["meta"]
        for note in meta.get("notes", []):
            _log(f"note: {note}")
        print(markdown(meta, record["summary"]))
        print("wrote " + ", ".join(meta["files"].values()))
        if all(row["status"] != "ok" for row in record["summary"]):
            status = EXIT_FAILED
    return status
