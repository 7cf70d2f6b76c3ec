"""``python -m attnsteer.lm_eval ARGS``: lm-evaluation-harness's command line, unchanged, with the
``attnsteer`` model registered (lm-eval has no plugin entry point for third-party models)::

    python -m attnsteer.lm_eval --model attnsteer \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,recipe=act-default --tasks mmlu --num_fewshot 5

Every other lm-eval model and option works as with ``lm_eval``.
"""

from __future__ import annotations


def main() -> None:
    """Register the model, then hand the command line to lm-eval's own ``lm_eval`` entry."""
    import attnsteer.integrations.lm_eval  # noqa: F401  (registers --model attnsteer)
    from attnsteer.integrations.lm_eval_compat import command_line

    command_line()()


if __name__ == "__main__":
    main()
