"""attnsteer inside the evaluation harnesses people already run.

- :mod:`attnsteer.integrations.lm_eval`: ``AttnsteerLM``, the ``attnsteer`` model of
  lm-evaluation-harness (text LLMs): ``python -m attnsteer.lm_eval --model attnsteer
  --model_args pretrained=...,recipe=act-default --tasks mmlu``.
- :mod:`attnsteer.integrations.lmms_eval`: ``AttnsteerLMMS``, the ``attnsteer`` model of
  lmms-eval (vision-language models), registered through the ``lmms_eval.models`` entry point:
  ``lmms-eval --model attnsteer --model_args pretrained=llava-hf/llava-1.5-7b-hf,recipe=var-llava15-7b``.
- :mod:`attnsteer.integrations.recipe_info`: what both record in the harness's results (the
  recipe as given, resolved, as applied, and its hash).

Importing this package imports neither harness; each module imports its own.
"""
