"""The Triton kernels check themselves (attnsteer.attention.selfcheck) before they serve a (rule kind,
dtype, head dim) for the first time in a process: here under Triton's CPU interpreter, with the
kernels right and with injected wrong kernels (wrong numbers, a compile error, a launch error).

A failing combination warns once, its calls are computed by the next backend (the router counts
each under ``handle.stats()``'s fallbacks, with the reason) without checking again, and other
combinations still get checked and run on the kernels."""

from __future__ import annotations

import os
import threading
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import build_tiny  # noqa: E402

import attnsteer  # noqa: E402
from attnsteer import compat, settings  # noqa: E402
from attnsteer import kernels as K  # noqa: E402
from attnsteer.attention import chunked, router, selfcheck  # noqa: E402
from attnsteer.attention import triton as T  # noqa: E402
from attnsteer.errors import AttnsteerWarning, SteeringError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the backend after triton under backend="auto": the CPU flash path on CPU, chunked on CUDA
NEXT = "flash" if DEVICE == "cpu" else "chunked"

GROUP = {
    "interventions": [
        {"method": "act", "layers": [1, 2], "params": {"threshold": 0.05, "beta": 0.2, "apply_to": "all"}}
    ]
}
REWEIGHT = {"interventions": [{"method": "softplus", "layers": [1, 2], "params": {"p": 2.0}}]}


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts with no combination checked, the kernels on CPU tensors (interpreter), and
    leaves the registry as it found it."""
    saved = dict(selfcheck.RESULTS)
    selfcheck.reset()
    monkeypatch.setenv("ATTNSTEER_TRITON", "1")
    for name in ("ATTNSTEER_TRITON_STRICT", "ATTNSTEER_TRITON_SELFCHECK"):
        monkeypatch.delenv(name, raising=False)
    yield
    selfcheck.reset()
    selfcheck.RESULTS.update(saved)


def _inputs():
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _forward(model, recipe, backend="auto", decode=True):
    """(prefill logits, decode logits or None, handle.stats()) of one prompt + one decode step."""
    inputs = _inputs()
    with attnsteer.apply(model, recipe, backend=backend) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        logits, step = out.logits, None
        if decode:
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(tok)], 1)
            cache = compat.with_cache(model, compat.output_cache(out))
            step = model(input_ids=tok, attention_mask=mask, **cache).logits
        stats = handle.stats()
    return logits, step, stats


def _paths(stats) -> dict:
    out: dict = {}
    for site in stats:
        for key, n in site["paths"].items():
            out[key] = out.get(key, 0) + n
    return out


def _fallbacks(stats) -> dict:
    out: dict = {}
    for site in stats:
        for key, n in site["fallbacks"].items():
            out[key] = out.get(key, 0) + n
    return out


def _self_check_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, selfcheck.KernelSelfCheckWarning)]


class Counter:
    """Wraps a kernel-path function: counts calls, optionally breaks its output or raises."""

    def __init__(self, original, shift=0.0, error=None):
        self.original, self.shift, self.error, self.calls = original, shift, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.error is not None:
            raise self.error
        out, rows = self.original(*args, **kwargs)
        return out + self.shift, rows


# ---- the synthetic calls ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(T.CAPABILITY.kinds))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernels_pass_their_self_check_and_the_check_is_not_vacuous(kind, dtype):
    report = selfcheck.check("triton", kind, dtype, 16, DEVICE, T.kernel_output)
    assert report.ok, report
    assert [p["phase"] for p in report.phases] == ["prefill", "decode"]
    for p in report.phases:  # the synthetic rule steers far beyond the tolerance
        assert p["effect"] > 0.2 and p["effect"] > 4 * p["tolerance"], p
    if kind == "group":
        assert "column_error" in report.phases[0]


def test_a_kernel_that_ignores_the_rule_fails_the_check():
    def plain(steps, call, q, k, v):
        return chunked.run(type(steps)(), call, q, k, v, selfcheck.NullStats())

    for kind in selfcheck.KINDS:
        report = selfcheck.check("fake", kind, torch.float32, 16, DEVICE, plain)
        assert not report.ok and "prefill output differs from the chunked path" in report.reason


def test_the_dtype_rule():
    ref = torch.tensor([1.0, -2.0, 3.0])
    assert selfcheck.dtype_rule(ref + 1e-6, ref, ref, torch.float32)[0]
    assert not selfcheck.dtype_rule(ref + 1e-2, ref, ref, torch.float32)[0]
    naive = ref + 0.05  # the plain bf16 computation is 0.05 off: the kernel may be up to 0.1 + one ulp
    ok, err, tol = selfcheck.dtype_rule(ref + 0.1, ref, naive, torch.bfloat16)
    assert ok and tol == pytest.approx(0.1 + 3 * torch.finfo(torch.bfloat16).eps)
    assert not selfcheck.dtype_rule(ref + 0.2, ref, naive, torch.bfloat16)[0]
    assert not selfcheck.dtype_rule(ref * float("nan"), ref, naive, torch.bfloat16)[0]


def test_the_check_leaves_the_random_stream_alone():
    state = torch.random.get_rng_state()
    selfcheck.check("triton", "reweight", torch.float32, 16, DEVICE, T.kernel_output)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_unknown_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="kind: got 'head'"):
        selfcheck.synthetic_rule("head", 4)


# ---- through a model: wrong numbers ----------------------------------------------------------------
def test_a_wrong_kernel_warns_once_and_its_combination_runs_on_the_next_backend(monkeypatch):
    model = build_tiny("llama").to(DEVICE)
    with torch.no_grad():
        base = model(**_inputs()).logits
    expected, expected_step, _ = _forward(model, GROUP, backend=NEXT)
    assert (expected - base).abs().max() > 1e-3  # the recipe steers: the comparisons below are not vacuous

    wrong = Counter(T._group, shift=0.5)
    monkeypatch.setattr(T, "_group", wrong)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logits, step, stats = _forward(model, GROUP)
        logits2, _, stats2 = _forward(model, GROUP, decode=False)
    assert wrong.calls == 1  # the synthetic prefill call only: never a real call, never checked again
    messages = _self_check_warnings(record)
    assert len(messages) == 1, messages
    assert "group rules, float32, head dim 16" in messages[0] and "chunked" in messages[0]
    assert issubclass(selfcheck.KernelSelfCheckWarning, AttnsteerWarning)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    torch.testing.assert_close(step, expected_step, atol=0, rtol=0)
    torch.testing.assert_close(logits2, expected, atol=0, rtol=0)
    assert _paths(stats) == {f"{NEXT}/prefill": 2, f"{NEXT}/decode": 2}, _paths(stats)
    for site in stats:  # every steered layer shows why
        ((reason, calls),) = site["fallbacks"].items()
        assert reason.startswith("triton: self-check failed: prefill output differs from the chunked path")
        assert reason.endswith("(group rules, float32, head dim 16)") and calls == 2
    assert set(_fallbacks(stats2)) == set(_fallbacks(stats))
    key = selfcheck.combination("triton", "group", torch.float32, 16)
    assert selfcheck.RESULTS[key].startswith("self-check failed")

    # the kernel is right again, but the combination stays on the next backend: no re-check
    monkeypatch.setattr(T, "_group", wrong.original)
    _, _, stats3 = _forward(model, GROUP, decode=False)
    assert set(_paths(stats3)) == {f"{NEXT}/prefill"}

    # other combinations are still checked and served by the kernels
    _, _, stats4 = _forward(model, REWEIGHT, decode=False)
    assert set(_paths(stats4)) == {"triton/prefill"} and not _fallbacks(stats4)
    half = build_tiny("llama", dtype=torch.bfloat16).to(DEVICE)
    _, _, stats5 = _forward(half, GROUP, decode=False)
    assert set(_paths(stats5)) == {"triton/prefill"}, stats5
    assert selfcheck.RESULTS[selfcheck.combination("triton", "reweight", torch.float32, 16)] == "ok"
    assert selfcheck.RESULTS[selfcheck.combination("triton", "group", torch.bfloat16, 16)] == "ok"


def test_forced_triton_raises_naming_the_failed_check(monkeypatch):
    monkeypatch.setattr(T, "_reweight", Counter(T._reweight, shift=-1.0))
    model = build_tiny("llama").to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", selfcheck.KernelSelfCheckWarning)
        with pytest.raises(
            SteeringError, match="backend='triton' cannot run layer 1's prefill call: self-check failed"
        ):
            _forward(model, REWEIGHT, backend="triton", decode=False)


# ---- compile and launch errors ---------------------------------------------------------------------
COMPILE_ERROR = K.KernelLaunchError("Triton kernel row_stats failed to compile: CompilationError: at 12:4: oops")
LAUNCH_ERROR = K.KernelLaunchError("Triton kernel attention failed: RuntimeError: CUDA error: illegal memory access")


@pytest.mark.parametrize("error, text", [(COMPILE_ERROR, "failed to compile"), (LAUNCH_ERROR, "illegal memory access")])
def test_a_compile_or_launch_error_in_the_check_routes_the_combination(monkeypatch, error, text):
    broken = Counter(T._reweight, error=error)
    monkeypatch.setattr(T, "_reweight", broken)
    model = build_tiny("llama").to(DEVICE)
    expected, _, _ = _forward(model, REWEIGHT, backend=NEXT, decode=False)
    with pytest.warns(selfcheck.KernelSelfCheckWarning, match=text) as record:
        logits, _, stats = _forward(model, REWEIGHT)
    assert len(_self_check_warnings(record)) == 1 and broken.calls == 1
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    (reason,) = _fallbacks(stats)
    assert reason.startswith("triton: self-check failed: prefill call raised KernelLaunchError") and text in reason


def test_strict_raises_the_kernel_error_and_a_mismatch(monkeypatch):
    monkeypatch.setenv("ATTNSTEER_TRITON_STRICT", "1")
    model = build_tiny("llama").to(DEVICE)
    monkeypatch.setattr(T, "_reweight", Counter(T._reweight, error=COMPILE_ERROR))
    with pytest.raises(K.KernelLaunchError, match="failed to compile"):
        _forward(model, REWEIGHT, decode=False)
    monkeypatch.setattr(T, "_reweight", Counter(T._reweight.original, shift=1.0))
    with pytest.raises(selfcheck.KernelSelfCheckError, match="failed its self-check for reweight rules"):
        _forward(model, REWEIGHT, decode=False)
    assert not selfcheck.RESULTS  # nothing recorded: the next call checks (and raises) again


def test_a_kernel_failure_on_a_real_call_routes_only_its_combination(monkeypatch):
    """The check passed (here: skipped), then a real call's kernel fails: warned once, that call and
    the later calls of the combination go to the next backend; the other kind keeps the kernels."""
    monkeypatch.setenv("ATTNSTEER_TRITON_SELFCHECK", "0")
    model = build_tiny("llama").to(DEVICE)
    expected, _, _ = _forward(model, GROUP, backend=NEXT, decode=False)
    broken = Counter(T._group, error=LAUNCH_ERROR)
    monkeypatch.setattr(T, "_group", broken)
    with pytest.warns(selfcheck.KernelSelfCheckWarning, match="illegal memory access") as record:
        logits, _, stats = _forward(model, GROUP, decode=False)
        logits2, _, _ = _forward(model, GROUP, decode=False)
    assert len(_self_check_warnings(record)) == 1 and broken.calls == 1
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    torch.testing.assert_close(logits2, expected, atol=0, rtol=0)
    assert set(_paths(stats)) == {f"{NEXT}/prefill"}
    ((reason, calls),) = _fallbacks(stats).items()  # the failing call (layer 1), then layer 2's, same reason
    assert calls == 2 and reason.startswith("triton: kernel failure: Triton kernel attention failed"), reason
    assert reason.endswith("(group rules, float32, head dim 16)")
    _, _, stats2 = _forward(model, REWEIGHT, decode=False)
    assert set(_paths(stats2)) == {"triton/prefill"}


# ---- when the check runs -----------------------------------------------------------------------------
def test_the_environment_can_skip_the_check(monkeypatch):
    monkeypatch.setenv("ATTNSTEER_TRITON_SELFCHECK", "0")
    assert settings.current().triton_selfcheck is False
    assert router.BackendConfig.from_settings().selfcheck is False
    calls = Counter(T._reweight)
    monkeypatch.setattr(T, "_reweight", calls)
    _, _, stats = _forward(build_tiny("llama").to(DEVICE), REWEIGHT, decode=False)
    assert calls.calls == 2 and set(_paths(stats)) == {"triton/prefill"}  # the two real calls only
    assert not selfcheck.RESULTS
    monkeypatch.setenv("ATTNSTEER_TRITON_SELFCHECK", "1")
    assert router.BackendConfig.from_settings().selfcheck is True


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors without the kernels")
def test_no_check_on_cpu_unless_the_kernels_run(monkeypatch):
    monkeypatch.delenv("ATTNSTEER_TRITON")
    _, _, stats = _forward(build_tiny("llama"), GROUP, decode=False)
    assert set(_paths(stats)) == {"flash/prefill"} and not selfcheck.RESULTS


def test_one_check_per_combination_across_threads():
    runs = []
    barrier = threading.Barrier(4)

    def slow_right(steps, call, q, k, v):
        runs.append(call.phase)
        return chunked.run(steps, call, q, k, v, selfcheck.NullStats())

    case = selfcheck.synthetic("reweight", "prefill", torch.float32, 16, DEVICE)
    call = case.call(case.q, case.k, case.prompt())
    results = []

    def worker():
        barrier.wait()
        results.append(selfcheck.ensure("threaded", "reweight", call, slow_right))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [None] * 4 and runs == ["prefill", "decode"]
    assert selfcheck.RESULTS[selfcheck.combination("threaded", "reweight", torch.float32, 16)] == "ok"


def test_no_check_while_a_graph_is_captured(monkeypatch):
    monkeypatch.setattr(selfcheck, "_capturing", lambda device: True)
    case = selfcheck.synthetic("group", "prefill", torch.float32, 16, DEVICE)
    call = case.call(case.q, case.k, case.prompt())
    assert selfcheck.ensure("captured", "group", call, lambda *a: pytest.fail("checked while capturing")) is None
    assert not selfcheck.RESULTS


def test_check_all_and_its_table():
    def right(steps, call, q, k, v):
        return chunked.run(steps, call, q, k, v, selfcheck.NullStats())

    reports = selfcheck.check_all("chunked", right, DEVICE, dtypes=(torch.float32, torch.bfloat16), head_dims=(8,))
    assert [(r.kind, r.dtype) for r in reports] == [
        ("score", "float32"), ("score", "bfloat16"), ("group", "float32"), ("group", "bfloat16"),
        ("reweight", "float32"), ("reweight", "bfloat16")
    ]  # fmt: skip
    assert all(r.ok for r in reports)
    table = selfcheck.markdown(reports)
    assert table.count("\n") == 2 + 2 * len(reports) and "| chunked | reweight | bfloat16 | 8 |" in table
    assert reports[0].as_dict()["phases"][0]["phase"] == "prefill"
