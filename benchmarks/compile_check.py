"""Compile every Triton kernel variant for NVIDIA GPUs without a GPU (ahead of time, to cubin).

    python benchmarks/compile_check.py --arch 90 --arch 80 --scope full --output evals/kernels

Prints a Markdown report per target (attnsteer.kernels.compile_check: the launchers' variants
compiled against a stand-in CUDA driver, registers / spills / shared memory per build), writes
``compile_sm<cc>.md`` / ``.json`` under ``--output`` and exits 1 if any variant fails to compile or
needs more shared memory than the target has (2 without triton's NVIDIA backend).
"""

from __future__ import annotations

import argparse
import sys

from attnsteer.kernels import compile_check as CC

PROG = "python benchmarks/compile_check.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability as 90, 80, ... (default 90)")
    parser.add_argument("--dtype", action="append", choices=sorted(CC.DTYPES), help="default: all three")
    parser.add_argument("--head-dim", type=int, action="append", help=f"default: {' '.join(map(str, CC.HEAD_DIMS))}")
    parser.add_argument(
        "--scope",
        choices=CC.SCOPES,
        default="modes",
        help="smoke: every kernel and mode once; modes (default): every constexpr variant (group "
        "counts, powers); full: also MHA / contiguous strides and causal / window masks",
    )
    parser.add_argument(
        "--only",
        help="regular expression: compile only the calls whose 'launcher variant' "
        "label matches (e.g. '^decode', 'reweight')",
    )
    parser.add_argument("--output", help="folder for compile_sm<cc>.md / .json")
    return parser.parse_args(argv)


def command_of(args: argparse.Namespace, cc: int) -> str:
    """The command that checks sm_<cc> alone with these settings (recorded in the reports)."""
    return (
        f"{PROG} --arch {cc}"
        + "".join(f" --dtype {x}" for x in args.dtype or ())
        + "".join(f" --head-dim {x}" for x in args.head_dim or ())
        + (f" --scope {args.scope}" if args.scope != "modes" else "")
        + (f" --only '{args.only}'" if args.only else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not CC.nvidia_backend_available():
        print(
            "compile_check: triton with its NVIDIA backend (ptxas) is not installed. Fix: pip install triton "
            "(its Linux wheels include it)",
            file=sys.stderr,
        )
        return 2
    dtypes, dims = tuple(args.dtype or CC.DTYPES), tuple(args.head_dim or CC.HEAD_DIMS)
    bad = 0
    for cc in args.arch or [90]:
        command = command_of(args, cc)
        check = CC.check_arch(cc, dtypes, dims, scope=args.scope, only=args.only, command=command)
        print(check.markdown)
        print(
            f"sm_{cc}: {len(check.records)} builds, {len(check.problems)} failed, {check.seconds:.0f} s",
            file=sys.stderr,
        )
        bad += len(check.problems)
        if args.output:
            CC.write_reports(
                check, args.output, scope=args.scope, only=args.only, dtypes=dtypes, head_dims=dims, command=command
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
