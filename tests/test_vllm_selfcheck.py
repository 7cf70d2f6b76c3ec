"""The vLLM FlexAttention path checks itself (attnsteer/vllm/flex_check.py), on CPU without vLLM:
torch's ``flex_attention`` runs the kernel eagerly, the paged cache is built here in the layout
FlexAttention's impl receives (keys then values on the last dim, blocks out of order), and each
request's keys are gathered back from it by the plugin's own reader.

The self-check passes for the real FlexAttention steering code (each kind, fp32 and bf16); a wrong
piece of it, or a kernel that raises, fails the check (or a real call), warns once, and the
requests of that (kind, dtype, head dim) are computed by the chunked path over their keys gathered
from the paged cache -- equal to the reference backend on each request alone, with the fallback
and its reason in the layer's stats -- while the other requests keep FlexAttention. The last tests
run the backend class itself over stand-ins of vLLM's FlexAttention classes."""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest
import torch

flex = pytest.importorskip("torch.nn.attention.flex_attention")

from attention_cases import HEADS, params, plan_of  # noqa: E402
from toy_methods import TOYS  # noqa: E402

from attnsteer.attention import reference, selfcheck  # noqa: E402
from attnsteer.attention.dispatch import SiteStats  # noqa: E402
from attnsteer.attention.geometry import AttentionCall, ForwardInfo, MaskView  # noqa: E402
from attnsteer.context import ContextStore, PromptState  # noqa: E402
from attnsteer.errors import SteeringError  # noqa: E402
from attnsteer.methods.act import ACT  # noqa: E402
from attnsteer.plan import Steps  # noqa: E402
from attnsteer.vllm import compat, flex_check, flex_rules, requests  # noqa: E402
from attnsteer.vllm.flex_check import NAME  # noqa: E402

H, HKV, D, BLOCK = 6, 2, 16, 16
SCALE = D**-0.5
LAUNCH = "CUDA error: an illegal memory access was encountered"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """No combination checked yet (a registry of the test's own), the settings' defaults. The eager
    kernel runs without torch's internal trace of each new score_mod (seconds a call on CPU;
    tests/test_vllm_flex_rules.py runs the steering code through it)."""
    monkeypatch.setattr(selfcheck, "RESULTS", {})
    monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True, raising=False)
    monkeypatch.delenv("ATTNSTEER_TRITON_STRICT", raising=False)
    monkeypatch.delenv("ATTNSTEER_TRITON_SELFCHECK", raising=False)


# ---- a packed step over a paged cache --------------------------------------------------------------
def _methods():
    return {
        "score": lambda: TOYS["toy_score"]({"c": 0.4}, 0, HEADS),  # s / 0.4 on three heads
        "group": lambda: ACT(params(ACT, threshold=0.05, beta=0.2, apply_to="all"), 0, None),
        "reweight": lambda: TOYS["toy_reweight"]({"c": 2.5}, 0, None),
        "head": lambda: TOYS["toy_head"]({"c": 2.0}, 0, None),
    }


class Packed:
    """Requests (tokens so far, rows, plan or None) packed as vLLM packs a step: queries (T, H, D)
    concatenated, keys and values (H_kv, n, D) in a FlexAttention cache (num_blocks, H_kv, BLOCK, 2 D)
    at shuffled blocks (block 0 unused)."""

    def __init__(self, reqs, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.reqs = reqs
        self.starts = [0]
        for _, rows, _ in reqs:
            self.starts.append(self.starts[-1] + rows)
        self.q = (torch.randn(self.starts[-1], H, D, generator=g) * 1.5).to(dtype)
        self.kv = []
        for n, _, _ in reqs:
            k = torch.randn(HKV, n, D, generator=g) * 1.5
            k[:, 3] *= 3.0  # one strong key: rows are not near-uniform
            self.kv.append((k.to(dtype), torch.randn(HKV, n, D, generator=g).to(dtype)))
        per = [-(-n // BLOCK) for n, _, _ in reqs]
        order = (torch.randperm(sum(per), generator=g) + 1).tolist()
        self.table = torch.zeros(len(reqs), max(per), dtype=torch.int32)
        storage = torch.zeros(sum(per) + 1, BLOCK, HKV, 2 * D, dtype=dtype)
        self.cache = storage.transpose(1, 2)
        for i, (k, v) in enumerate(self.kv):
            self.table[i, : per[i]] = torch.tensor([order.pop() for _ in range(per[i])])
            compat.flex_write_request_kv(self.cache, self.table[i], k, v)
        self.step = flex_check.PagedStep(self.cache, self.table, [n for n, _, _ in reqs], self.starts)

    def rows(self, i) -> slice:
        return slice(self.starts[i], self.starts[i + 1])

    def attend(self, kernel=flex_check.eager_kernel):
        return self.step.attend(self.q, SCALE, kernel)

    def slices(self):
        """A RequestSlice per steered request (its own SiteStats, begun), keys read from the cache."""
        out = []
        for i, (n, rows, plan) in enumerate(self.reqs):
            if plan is None:
                continue
            steps = plan.steps(n == rows)
            stats = SiteStats(plan.methods)
            stats.begin({rule.method for rule in (*steps.score, *steps.weight, *steps.head)})

            def kv(i=i, n=n):
                return compat.flex_read_request_kv(self.cache, self.table[i], n, HKV, D)

            r = self.rows(i)
            out.append(flex_rules.RequestSlice(r.start, r.stop, n, steps, PromptState(), kv, stats))
        return out

    def expected(self, i, steered=True) -> torch.Tensor:
        """The reference backend (materialised float32) on request i alone, its keys in position
        order, then its head rules -> (C, H, D)."""
        n, rows, plan = self.reqs[i]
        k, v = (x.float().unsqueeze(0) for x in self.kv[i])
        q = self.q[self.rows(i)].float().transpose(0, 1).unsqueeze(0)
        visible = torch.arange(n).view(1, -1) <= torch.arange(n - rows, n).view(-1, 1)
        info = ForwardInfo(q_len=rows, past_len=n - rows, total_len=n, first_valid=None, batch=1)
        call = AttentionCall(0, info, q, k, MaskView(visible.view(1, 1, rows, n), rows, n), SCALE, PromptState())
        steps = plan.steps(n == rows) if plan is not None and steered else Steps((), (), ())
        out = reference.attend(steps, call, q, k, v)[0]
        for rule in steps.head:
            out, _ = rule.apply(out, call, call.prompt)
        return out[0]


def _warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, selfcheck.KernelSelfCheckWarning)]


def _assert_rows(packed, out, i, atol=3e-5):
    """Request i's rows equal the reference on it alone, and its rules change them by > 1e-3."""
    want = packed.expected(i)
    torch.testing.assert_close(out[packed.rows(i)], want, atol=atol, rtol=1e-4)
    if packed.reqs[i][2] is not None:
        effect = float((want - packed.expected(i, steered=False)).abs().max())
        assert effect > 1e-3, f"request {i} is not steered ({effect})"


# ---- (a) the real FlexAttention code passes -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", flex_check.KINDS)
def test_the_flex_path_passes_its_self_check_and_the_check_is_not_vacuous(kind, dtype):
    report = selfcheck.check(NAME, kind, dtype, D, "cpu", flex_check.synthetic_run(), pads=flex_check.PACKED)
    assert report.ok, report
    assert [p["phase"] for p in report.phases] == ["prefill", "decode"]
    for p in report.phases:  # the synthetic rule steers beyond the tolerance, and the error is far below it
        assert p["effect"] > 0.05 and p["effect"] > 2 * p["tolerance"] and p["error"] < p["effect"] / 8, p
    if kind == "group":
        assert "column_error" in report.phases[0]


def test_a_flex_path_that_ignores_the_rule_fails_the_check():
    def plain(steps, call, q, k, v):
        return flex_check.synthetic_run()(Steps((), (), ()), call, q, k, v)

    report = selfcheck.check(NAME, "score", torch.float32, D, "cpu", plain, pads=flex_check.PACKED)
    assert not report.ok and report.reason.startswith("prefill output differs from the chunked path"), report


def test_kinds_of_a_request():
    plan = plan_of(*(make() for make in _methods().values()))
    assert flex_check.kinds(plan.steps(True)) == ("score", "group", "reweight")
    assert flex_check.kinds(plan_of(_methods()["head"]()).steps(True)) == ()


# ---- (b) a wrong piece of the FlexAttention code ---------------------------------------------------
def _wrong(monkeypatch, kind):
    """Break one kind's FlexAttention piece: its output (or its scores) move by a key-dependent amount."""
    if kind == "score":
        original = flex_rules.ScoreMod.__call__
        monkeypatch.setattr(flex_rules.ScoreMod, "__call__",
                            lambda self, s, b, h, q, kv, physical_q=None: original(self, s, b, h, q, kv, physical_q)
                            + 0.5 * (kv % 2))  # fmt: skip
    elif kind == "reweight":
        original = flex_rules.ReweightMod.__call__
        monkeypatch.setattr(flex_rules.ReweightMod, "__call__",
                            lambda self, s, b, h, q, kv, physical_q=None: original(self, s, b, h, q, kv, physical_q)
                            + 0.5 * (kv % 2))  # fmt: skip
    else:
        original = flex_rules.correct_group
        monkeypatch.setattr(flex_rules, "correct_group", lambda *a, **k: original(*a, **k) + 0.1)


class CountingCheck:
    """selfcheck.check, counting its calls by kind."""

    def __init__(self):
        self.original, self.kinds = selfcheck.check, []

    def __call__(self, backend, kind, *args, **kwargs):
        self.kinds.append(kind)
        return self.original(backend, kind, *args, **kwargs)


@pytest.mark.parametrize("kind", flex_check.KINDS)
def test_a_wrong_piece_fails_the_check_and_its_requests_run_chunked_from_the_paged_cache(monkeypatch, kind):
    """One step: a request steered by ``kind`` (prefill), an unsteered decode row, a head-rule-only
    decode row. The kind's check fails once and warns once; its request equals the reference on it
    alone (through the chunked path over its keys read back from the cache); the others keep the
    kernel; the stats show each path and the fallback's reason. A second step checks nothing again."""
    methods = _methods()
    steered, head = plan_of(methods[kind]()), plan_of(methods["head"]())
    packed = Packed([(20, 20, steered), (23, 1, None), (21, 1, head)])
    _wrong(monkeypatch, kind)
    checks = CountingCheck()
    monkeypatch.setattr(selfcheck, "check", checks)
    gate = flex_check.Gate()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        slices = packed.slices()
        out = gate.steer(0, packed.q, slices, SCALE, packed.attend())
        again = packed.slices()
        out2 = gate.steer(0, packed.q, again, SCALE, packed.attend())
    (message,) = _warnings(record)
    assert f"the {NAME} backend failed for {kind} rules, float32, head dim {D}: self-check failed" in message
    assert checks.kinds == [kind]  # checked once, never again
    for i in range(3):
        _assert_rows(packed, out, i)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    (fallback,) = slices[0].stats.fallbacks.items()
    assert fallback[0].startswith(f"{NAME}: self-check failed: prefill output differs from the chunked path")
    assert fallback[0].endswith(f"({kind} rules, float32, head dim {D})") and fallback[1] == 1
    assert dict(slices[0].stats.paths) == {"chunked/prefill": 1}
    assert dict(slices[1].stats.paths) == {f"{NAME}/decode": 1} and not slices[1].stats.fallbacks
    assert selfcheck.failure(NAME, kind, torch.float32, D).startswith("self-check failed")
    assert selfcheck.failure(NAME, kind, torch.bfloat16, D) is None  # other dtypes are still checked


# ---- (c) a kernel that raises ----------------------------------------------------------------------
def _raising_kernel(q, k, v, score_mod, block_mask, scale):
    """The FlexAttention kernel failing whenever attnsteer hands it a score_mod (plain calls run)."""
    if score_mod is not None:
        raise RuntimeError(LAUNCH)
    return flex_check.eager_kernel(q, k, v, score_mod, block_mask, scale)


def test_a_kernel_that_raises_in_the_check_gives_its_kind_back(monkeypatch):
    """A re-weight request (its second pass hands the kernel a score_mod) fails its check with the
    kernel's error; a group request (a plain pass and a PyTorch correction) passes and keeps the kernel."""
    methods = _methods()
    packed = Packed([(22, 5, plan_of(methods["reweight"]())), (20, 20, plan_of(methods["group"]()))])
    with pytest.warns(selfcheck.KernelSelfCheckWarning, match="illegal memory access") as record:
        slices = packed.slices()
        out = flex_check.Gate(_raising_kernel).steer(0, packed.q, slices, SCALE, packed.attend(_raising_kernel))
    assert len(_warnings(record)) == 1
    for i in range(2):
        _assert_rows(packed, out, i)
    (reason,) = slices[0].stats.fallbacks
    assert reason.startswith(f"{NAME}: self-check failed: prefill call raised RuntimeError: {LAUNCH}"), reason
    assert dict(slices[0].stats.paths) == {"chunked/chunk": 1}
    assert dict(slices[1].stats.paths) == {f"{NAME}/prefill": 1}


def test_a_kernel_failure_on_a_real_call_gives_back_the_kinds_it_carried(monkeypatch):
    """Unchecked (ATTNSTEER_TRITON_SELFCHECK=0), a real call's kernel raises: warned once, its
    requests of the kinds it carried are computed by the chunked path (a head-rule-only request keeps
    a plain kernel call), and those kinds stay there; a later call with another kind keeps the kernel."""
    monkeypatch.setenv("ATTNSTEER_TRITON_SELFCHECK", "0")
    methods = _methods()
    gate = flex_check.Gate.from_settings(_raising_kernel)
    assert gate.selfcheck is False and gate.strict is False
    packed = Packed([(20, 20, plan_of(methods["score"]())), (23, 1, None), (21, 1, plan_of(methods["head"]()))])
    with pytest.warns(selfcheck.KernelSelfCheckWarning, match="kernel failure: RuntimeError") as record:
        slices = packed.slices()
        out = gate.steer(0, packed.q, slices, SCALE, packed.attend(_raising_kernel))
    assert len(_warnings(record)) == 1
    for i in range(3):
        _assert_rows(packed, out, i)
    (reason,) = slices[0].stats.fallbacks
    assert reason == f"{NAME}: kernel failure: RuntimeError: {LAUNCH} (score rules, float32, head dim {D})"
    assert dict(slices[0].stats.paths) == {"chunked/prefill": 1}
    assert dict(slices[1].stats.paths) == {f"{NAME}/decode": 1} and not slices[1].stats.fallbacks  # head rules
    assert selfcheck.failure(NAME, "score", torch.float32, D).startswith("kernel failure")
    other = Packed([(22, 1, plan_of(methods["reweight"]()))], seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", selfcheck.KernelSelfCheckWarning)
        piece = other.slices()
        out = gate.steer(0, other.q, piece, SCALE, other.attend())
    _assert_rows(other, out, 0)
    assert dict(piece[0].stats.paths) == {f"{NAME}/decode": 1}


def test_strict_raises_a_mismatch_and_a_kernel_failure(monkeypatch):
    monkeypatch.setenv("ATTNSTEER_TRITON_STRICT", "1")
    methods = _methods()
    packed = Packed([(22, 1, plan_of(methods["reweight"]()))])
    _wrong(monkeypatch, "reweight")
    with pytest.raises(selfcheck.KernelSelfCheckError, match=f"{NAME} backend failed its self-check for reweight"):
        flex_check.Gate.from_settings().steer(0, packed.q, packed.slices(), SCALE, packed.attend())
    monkeypatch.setenv("ATTNSTEER_TRITON_SELFCHECK", "0")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        flex_check.Gate.from_settings(_raising_kernel).steer(0, packed.q, packed.slices(), SCALE,
                                                             packed.attend(_raising_kernel))  # fmt: skip
    assert not selfcheck.RESULTS  # nothing recorded: raised instead


# ---- the backend class, over stand-ins of vLLM's FlexAttention classes -----------------------------
class _Metadata:
    """What the impl reads of vLLM 0.34's FlexAttentionMetadata, over a :class:`Packed` step."""

    def __init__(self, packed: Packed):
        self.packed = packed
        self.num_reqs = len(packed.reqs)
        self.query_start_loc_cpu = torch.tensor(packed.starts)
        self.seq_lens = torch.tensor([n for n, _, _ in packed.reqs])
        self.block_table = packed.table
        self.num_actual_tokens = packed.starts[-1]
        self.score_mod = self.transformed_score_mod = None

    def get_transformed_score_mod(self):
        return self.packed.step.score_mod(self.score_mod)


class _Impl:
    """vLLM 0.34's FlexAttentionImpl as far as the plugin uses it: the kernel over the metadata's
    step with its ``transformed_score_mod``, ``out_transform(out, lse)`` when set."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, sliding_window=None, **kwargs):
        self.num_heads, self.head_size, self.scale, self.num_kv_heads = num_heads, head_size, scale, num_kv_heads
        self.sliding_window, self.attn_type, self.out_transform = sliding_window, "decoder", None

    def forward(self, layer, query, key, value, kv_cache, md, output, output_scale=None, output_block_scale=None):
        t = md.num_actual_tokens
        q, k, v, mask = md.packed.step.tensors(query[:t])
        out, lse = flex_check.eager_kernel(q, k, v, md.transformed_score_mod, mask, self.scale)
        if self.out_transform is not None:
            out = self.out_transform(out, lse)
        output[:t] = out[0].transpose(0, 1)
        return output


@pytest.fixture
def flex_backend(monkeypatch):
    """attnsteer.vllm.flex_backend imported over the stand-ins (no vLLM needed); steering from
    ``STEERING`` (engine plans, per-request recipes by name); requests' facts set per test."""
    monkeypatch.setattr(compat, "flex_attention_classes", lambda: (object, _Impl, object, _Metadata))
    monkeypatch.setattr(compat, "decoder_attention_type", lambda: "decoder")
    monkeypatch.setattr(compat, "current_vllm_config", lambda: None)
    monkeypatch.setattr(compat, "tensor_parallel", lambda: (0, 1))
    monkeypatch.setattr(compat, "layer_index", lambda name: 0)
    monkeypatch.setattr(compat, "flex_kernel", lambda: flex_check.eager_kernel)
    monkeypatch.setattr(requests, "install", lambda *a, **k: None)
    monkeypatch.setattr(requests, "STATES", ContextStore())
    monkeypatch.setattr(requests, "_PREFILLED", {})
    monkeypatch.setattr(requests, "_DUMMY", [False])
    sys.modules.pop("attnsteer.vllm.flex_backend", None)
    module = importlib.import_module("attnsteer.vllm.flex_backend")
    yield module
    sys.modules.pop("attnsteer.vllm.flex_backend", None)
    import attnsteer.vllm

    attnsteer.vllm.__dict__.pop("flex_backend", None)


def _engine(module, monkeypatch, plans, whole, recipes):
    """An impl steering with engine ``plans`` (needing whole prompts: ``whole``) and per-request
    ``recipes``: name -> (plans, whole)."""
    steering = types.SimpleNamespace(
        plans=plans, needs_whole_prompt=whole, needs_requests=True, per_request=True, input_layers=set(),
        modalities=("image",), request_plans=lambda name: recipes[name],
    )  # fmt: skip
    monkeypatch.setattr(module, "steering_for", lambda config, *tp, **kw: steering)
    return module.AttnsteerFlexImpl(num_heads=H, head_size=D, scale=SCALE, num_kv_heads=HKV, sliding_window=None)


def _forward(impl, packed, facts, monkeypatch):
    monkeypatch.setattr(requests, "_STEP", facts)
    output = torch.zeros(packed.starts[-1], H, D)
    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    return impl.forward(layer, packed.q, None, None, packed.cache, _Metadata(packed), output)


def test_the_backend_routes_a_failed_kind_to_the_chunked_path_over_its_paged_keys(flex_backend, monkeypatch):
    """Through AttnsteerFlexImpl.forward: a request of the engine's recipe whose kind fails its
    check is computed from its keys gathered from the cache; a request with its own recipe of
    another kind keeps the kernel; an unsteered one gets plain attention. The layer's stats count it."""
    methods = _methods()
    engine, own = plan_of(methods["reweight"]()), plan_of(methods["score"]())
    packed = Packed([(20, 20, engine), (23, 1, own), (21, 3, None)])
    impl = _engine(flex_backend, monkeypatch, {0: engine}, False, {"own": ({0: own}, False), "none": ({}, False)})
    facts = [requests.RequestFacts("a", 20, None), requests.RequestFacts("b", 22, None, "own"),
             requests.RequestFacts("c", 18, None, "none")]  # fmt: skip
    _wrong(monkeypatch, "reweight")
    with pytest.warns(selfcheck.KernelSelfCheckWarning, match="reweight rules, float32, head dim 16"):
        out = _forward(impl, packed, facts, monkeypatch)
    for i in range(3):
        _assert_rows(packed, out, i)
    stats = impl._stats[id(engine)]
    ((reason, calls),) = stats.fallbacks.items()
    assert reason.startswith(f"{NAME}: self-check failed: prefill output differs") and calls == 1
    assert dict(stats.paths) == {"chunked/prefill": 1} and stats.rows(engine.methods[0]) > 0
    assert dict(impl._stats[id(own)].paths) == {f"{NAME}/decode": 1}


def test_the_whole_prompt_check_reads_the_requests_own_recipe(flex_backend, monkeypatch):
    """A prompt chunk (4 rows after 16 of a 30-token prompt) is refused when the request's own
    recipe needs whole prompts, though the engine's does not; and runs when only the engine's does."""
    head = plan_of(_methods()["head"]())
    packed = Packed([(20, 4, head)])
    needs = _engine(flex_backend, monkeypatch, {0: head}, False, {"whole": ({0: head}, True)})
    with pytest.raises(SteeringError, match="prompt chunk after 16 tokens"):
        _forward(needs, packed, [requests.RequestFacts("a", 30, None, "whole")], monkeypatch)
    free = _engine(flex_backend, monkeypatch, {0: head}, True, {"free": ({0: head}, False)})
    out = _forward(free, packed, [requests.RequestFacts("a", 30, None, "free")], monkeypatch)
    _assert_rows(packed, out, 0)


def test_the_whole_prompt_rule():
    check = requests.check_whole_prompt
    check(0, True, 0, 20, 20)  # the whole prompt
    check(0, True, 19, 1, 20)  # a decode row
    check(0, True, 24, 3, 20)  # rows after the prompt (a recomputed request's generated tokens)
    check(0, False, 8, 4, 20)  # a chunk, for a recipe that does not need whole prompts
    with pytest.raises(SteeringError, match="layer 3: a request reached attention as a prompt chunk after 8 tokens"):
        check(3, True, 8, 4, 20)
