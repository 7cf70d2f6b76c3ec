"""What ``attnsteer eval pope | chair | mmlu`` share: flags -> :class:`RunConfig`, and printing a run."""

from __future__ import annotations

import sys

from . import _args


def stderr(line: str) -> None:
    """The run's one-line notes (worded whole by the core), on stderr: stdout carries the results table."""
    print(line, file=sys.stderr, flush=True)


def run_config(args, model_id: str, model_kwargs: dict):
    """The run settings of the parsed flags."""
    from ..evals import RunConfig

    return RunConfig(
        seeds=_args.seeds_of(args),
        limit=args.limit,
        batch_size=args.batch_size,
        backend=args.backend,
        output_path=args.output_path,
        model_id=model_id,
        model_args=args.model_args,
        model_kwargs=model_kwargs,
        progress=not args.no_progress,
        log=stderr,
    )


def decoding(args):
    from ..evals.vlm import Decoding

    return Decoding(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.num_beams)


def check_output_path(args) -> None:
    """``--output_path``, when given, checked writable before data or model loading."""
    from ..evals.paths import check_writable

    if getattr(args, "output_path", None):
        check_writable(args.output_path, "--output_path", folder=True)


def report(results) -> int:
    """Print a finished run: the table on stdout; notes and the files written on stderr."""
    if results is None:  # not the main process of a launch
        return 0
    print(results.markdown(), flush=True)
    for note in results.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {results.path / 'results.json'} and {results.path / 'samples.jsonl'}", file=sys.stderr)
    return 0


def evaluate_vlm(args, task) -> int:
    """Prepare ``task`` (data errors first), load the vision-language model, run, print."""
    from ..console import quiet_transformers
    from ..evals import run
    from ..evals.dist import Dist
    from ..evals.specs import parse_recipes
    from ..evals.vlm import load_vlm, require_vlm
    from ..models import resolve_model

    check_output_path(args)
    if args.model:
        require_vlm(args.model)
    specs = parse_recipes(args.recipe)
    task.prepared(args.limit)
    model_id, kwargs = resolve_model(args.model, args.model_args)
    with quiet_transformers():
        processor, model = load_vlm(model_id, kwargs, Dist())
    return report(run(model, processor, task, specs, run_config(args, model_id, kwargs)))
