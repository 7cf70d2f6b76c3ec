"""What one steered prefill allocates on CPU, free of the allocator's retention.

Loads the embedded SmolLM2-135M-Instruct in a fresh process, optionally steers it, warms up on
64 tokens, returns freed memory to the OS (malloc_trim), resets the resident high-water mark and
runs one prefill of ``--len`` random tokens. Prints the high-water mark above the resident set
before the prefill (MiB) as one JSON line.

glibc keeps freed heap memory for reuse, so this number depends on the allocation pattern as much
as on what is alive at once. Run it with ``MALLOC_MMAP_THRESHOLD_=262144`` in the environment
(blocks >= 256 KiB come from mmap and go back to the OS when freed) to see the peak of live memory.

    for r in none act-default softplus-reweight; do
      MALLOC_MMAP_THRESHOLD_=262144 .venv/bin/python benchmarks/cpu_prefill_memory.py --recipe $r --len 8176
    done
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re

import torch

import attnsteer
from attnsteer.models import load_smollm2


def _kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+)", fh.read(), re.M).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="none", help="a recipe name, or none for the unsteered model")
    parser.add_argument("--len", type=int, default=2048)
    args = parser.parse_args(argv)
    _, model = load_smollm2()
    ids = torch.randint(100, model.config.vocab_size, (1, args.len), generator=torch.Generator().manual_seed(0))
    handle = None if args.recipe == "none" else attnsteer.apply(model, args.recipe)
    with torch.no_grad():
        model(ids[:, :64], use_cache=True, logits_to_keep=1)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _kib("VmRSS")
        model(ids, use_cache=True, logits_to_keep=1)
        extra = (_kib("VmHWM") - before) / 1024
    if handle is not None:
        handle.remove()
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(json.dumps({"recipe": args.recipe, "len": args.len, "prefill_extra_mib": round(extra, 1), "env": env}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
