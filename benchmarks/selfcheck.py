"""The Triton kernels' self-check (attnsteer.attention.selfcheck) for every rule kind, dtype and head dim.

    python benchmarks/selfcheck.py --out DIR [--dtypes float16,bfloat16,float32] [--head-dims 64,128]

Each combination is checked fresh (the per-process registry is neither read nor written): a small
synthetic prefill and decode call computed by the kernels and by the chunked PyTorch path,
compared by the suite's dtype rule. On CUDA the kernels are compiled; without CUDA they run in
Triton's CPU interpreter (set here before anything defines them) on the small CPU-sized call.
Writes DIR/selfcheck.json and DIR/selfcheck.md; prints the table; exit code 1 if a combination
failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for selfcheck.json and selfcheck.md")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--kinds", default="group,reweight")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    from attnsteer import kernels as K
    from attnsteer.attention import selfcheck
    from attnsteer.attention import triton as T

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [DTYPES[name] for name in _list(args.dtypes)]
    head_dims = [int(d) for d in _list(args.head_dims)]
    kinds = _list(args.kinds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not K.available():
        print("triton is not installed: nothing to check", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    reports = selfcheck.check_all(T.NAME, T.kernel_output, device, kinds, dtypes, head_dims)
    seconds = time.perf_counter() - t0
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "interpreted": K.interpreting(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
    }
    failed = [r for r in reports if not r.ok]
    record = {
        "machine": machine,
        "seconds": seconds,
        "combinations": len(reports),
        "failed": len(failed),
        "reports": [r.as_dict() for r in reports],
    }
    (out / "selfcheck.json").write_text(json.dumps(record, indent=2) + "\n")
    header = (
        f"# Triton kernels' self-check on {machine['device']}\n\n"
        f"- torch {machine['torch']}, triton {machine['triton']}"
        f"{' (interpreter)' if machine['interpreted'] else ''}; {len(reports)} combinations, "
        f"{len(failed)} failed, {seconds:.1f} s (the first check of each kernel variant compiles it)\n"
        "- rule: fp16/bf16 within 2x the plain same-dtype error + max(1e-3, one ulp at max|ref|); fp32 within "
        "2e-5 + 1e-4 max|ref|; capped at half the steering effect (docs/kernels.md#the-self-check)\n\n"
    )
    table = header + selfcheck.markdown(reports)
    (out / "selfcheck.md").write_text(table)
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
