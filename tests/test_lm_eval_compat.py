"""Every lm-eval internal that attnsteer touches (attnsteer/integrations/lm_eval_compat.py), checked by
name and shape on the installed lm-eval: a release that renames or reshapes one fails here, loudly,
instead of changing evaluation results quietly."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("lm_eval")

import lm_eval.evaluator as evaluator  # noqa: E402
import lm_eval.models.huggingface as hf  # noqa: E402
import torch  # noqa: E402

from attnsteer.integrations import lm_eval_compat as compat  # noqa: E402


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_hflm_pads_its_batches_with_pad_and_concat_and_the_wrapper_sees_true_lengths():
    assert _params(hf.pad_and_concat)[:3] == ["max_length", "tensors", "padding_side"]
    assert "pad_and_concat" in inspect.getsource(hf.HFLM._loglikelihood_tokens), (
        "HFLM._loglikelihood_tokens no longer pads through pad_and_concat: AttnsteerLM's left padding cannot learn "
        "the true row lengths"
    )
    seen = []
    with compat.recording_right_padding(seen.append):
        padded = hf.pad_and_concat(5, [torch.ones(3, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    assert seen == [[3, 5]] and padded.shape == (2, 5)
    assert hf.pad_and_concat.__name__ == "pad_and_concat"  # restored


def test_the_hflm_methods_attnsteer_overrides_keep_their_signatures():
    assert _params(hf.HFLM._loglikelihood_tokens) == ["self", "requests", "disable_tqdm", "override_bs"]
    assert _params(hf.HFLM._model_call) == ["self", "inps", "attn_mask", "labels"]
    assert compat.HFLM is hf.HFLM


def test_rank_and_world_size_are_read_from_the_attributes_share_out_sets():
    for prop, attr in (("rank", "_rank"), ("world_size", "_world_size")):
        source = inspect.getsource(getattr(hf.HFLM, prop).fget)
        assert f"self.{attr}" in source, f"HFLM.{prop} no longer reads self.{attr}"
    lm = object.__new__(hf.HFLM)
    compat.share_out(lm, 1, 3, accelerator="acc")
    assert (lm.rank, lm.world_size, lm.accelerator) == (1, 3, "acc")


def test_quiet_silences_the_evaluators_environment_dump_and_restores_it():
    originals = {name: getattr(evaluator, name) for name in ("add_env_info", "get_git_commit_hash")}
    with compat.quiet():
        for name, original in originals.items():
            assert getattr(evaluator, name) is not original
        evaluator.add_env_info({})
        assert evaluator.get_git_commit_hash() is None
    for name, original in originals.items():
        assert getattr(evaluator, name) is original
    source = inspect.getsource(evaluator.simple_evaluate)
    assert "add_env_info" in source, "simple_evaluate no longer calls add_env_info: quiet() patches nothing"


def test_loglikelihood_requests_and_the_task_index():
    request = compat.loglikelihood_request("Q: 2+2=", " 4", 7)
    assert request.request_type == "loglikelihood" and request.args == ("Q: 2+2=", " 4") and request.idx == 7
    from attnsteer.evals.tasks.mmlu import packaged_tasks_dir

    manager = compat.task_manager([str(packaged_tasks_dir())], include_defaults=False)
    assert "attnsteer_mc_demo" in compat.known_task_names(manager)


def test_simple_evaluate_takes_every_argument_attnsteer_passes():
    taken = set(_params(evaluator.simple_evaluate))
    passed = {"model", "tasks", "num_fewshot", "task_manager", "limit", "bootstrap_iters", "log_samples", "use_cache",
              "apply_chat_template", "random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"}  # fmt: skip
    assert passed <= taken, f"lm_eval.simple_evaluate lost {sorted(passed - taken)}"
    assert callable(compat.command_line()) and compat.version()
