"""Every model-level step and every per-prompt state under ``model.generate()``, the way users run it.

At every step, the logits ``generate()`` returns equal a from-scratch recomputation of that step:
the prompt's prefill in a fresh cache (a new prompt for attnsteer: every per-prompt state --
ACT's and VAR's sinks, VHR's heads, PAI's text-only stream, AGLA's views -- found again), then
every token generated so far in one forward. The recomputation never runs ``generate()`` and never
feeds a token at a time, so state that ``generate()`` mishandles (a phase decided after the
cache was filled, rows reordered by beam search, prompts expanded for ``num_return_sequences``)
shows up as a difference. Modes: greedy, seeded sampling, left-padded batches (every mode), a
static cache, beam search and ``num_return_sequences``.

PAI's ``gamma`` is also checked against its formula with nothing of attnsteer's logits step: the
image stream with PAI's attention (``gamma`` off) and the unsteered text-only stream, each a
forward over the sequence so far, contrasted in the test.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny
from transformers import LogitsProcessor, LogitsProcessorList
from vlm_fixtures import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, build_vlm, make_inputs

import attnsteer
from attnsteer import compat
from attnsteer.errors import SteeringError

STEPS = 3
NEVER = [IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END]  # a generated placeholder would read as an image

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
    "beams": dict(do_sample=False, num_beams=2),
    "return_sequences": dict(do_sample=True, top_k=0, num_return_sequences=2),
}

PAI_GAMMA = {"method": "pai", "params": {"alpha": 0.5, "gamma": 1.1}}
VHR = {"method": "vhr", "layers": "all"}
VAR = {"method": "var", "layers": "all", "params": {"tau": 2.8, "rho": 0.3, "min_image_attention": 0.05}}
ACT_ALL = {"method": "act", "layers": "all", "params": {"apply_to": "all"}}
SOFTPLUS = {"method": "softplus", "layers": "all", "params": {"p": 2.0}}
VAF = {"method": "vaf", "layers": "all", "params": {"alpha": 1.6, "beta": 0.6}}
HGAI = {"method": "hgai", "layers": "all", "params": {"alpha": 0.8}}
SPIN = {"method": "spin", "layers": "all", "params": {"rho": 0.5, "eps": 0.1}}
VHR_FIXED = {"method": "vhr", "heads": {1: [0, 2], 2: [1]}, "params": {"selection": "fixed", "alpha": 2.0}}

# recipes on the tiny LLaVA (image keys) and on the tiny Llama (focus span)
VLM_RECIPES = {
    "pai_gamma": [PAI_GAMMA],
    "vhr": [VHR],
    "var": [VAR],
    "vhr+pai_gamma": [VHR, PAI_GAMMA],
    "var+vhr": [{**VAR, "layers": "0:3"}, VHR],  # VHR's reinforcement leaves layer 3 without image-centric rows
    "vaf": [VAF],
    "hgai": [HGAI],
    "vaf+hgai+vhr": [VAF, HGAI, VHR],
    "spin": [SPIN],
    "vaf+spin": [VAF, SPIN],
}
TEXT_RECIPES = {
    "act_all": [ACT_ALL],
    "act_all+softplus": [ACT_ALL, SOFTPLUS],
    "pai_gamma_focus": [PAI_GAMMA],
    "var_focus": [{"method": "var", "layers": "all", "params": {"tau": 2.5, "rho": 0.3, "min_image_attention": 0.0}}],
    "vaf_focus": [VAF],
    "hgai_focus": [HGAI],
    "spin_focus": [SPIN],
    "seka_focus": None,  # random projections for the tiny Llama, written by the seka_intervention fixture
    "vhr_fixed": [VHR_FIXED],
}
# score-level methods whose per-row state is only the prompt's roles: greedy, beams (roles follow the
# reorder) and returned sequences cover them; the other modes add cost, not coverage
SCORE_ONLY = {"vaf", "hgai", "vaf_focus", "hgai_focus", "vaf+spin"}
SCORE_ONLY_MODES = ("greedy", "beams", "return_sequences")


def cases(recipes: dict) -> list:
    return [(n, m) for n in recipes for m in MODES if n not in SCORE_ONLY or m in SCORE_ONLY_MODES]


# a static cache holds the prompt batch; these methods add a second stream to the batch
NEEDS_DYNAMIC_CACHE = {"vhr", "vhr+pai_gamma", "var+vhr", "vaf+hgai+vhr"}


class Recorder(LogitsProcessor):
    """The sequences each ``generate()`` step fed to the model (the running beams under beam search)."""

    def __init__(self):
        self.fed: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.fed.append(input_ids.clone())
        return scores


@pytest.fixture(scope="module")
def llava():
    return build_vlm("llava")


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def seka_intervention(llama, tmp_path_factory):
    """A SEKA intervention on layers 1-3 of the tiny Llama with random rank-3 projections (P+ and P-)."""
    from test_seka import random_projections

    from attnsteer.recipe import file_sha256

    file = random_projections(llama, [1, 2, 3]).save(tmp_path_factory.mktemp("seka") / "p.safetensors")
    params = {"g_pos": 2.0, "g_neg": 0.5, "projections": {"path": str(file), "sha256": file_sha256(file)}}
    return {"method": "seka", "layers": [1, 2, 3], "params": params}


def vlm_inputs(model):
    inputs = make_inputs("llava", model, n_images=[1, 1], seed=3)
    assert not inputs["attention_mask"].bool().all(), "the batch must be left-padded"
    return inputs


def text_inputs():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 96, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    focus = torch.zeros_like(ids, dtype=torch.bool)
    focus[:, 6:10] = True
    return {"input_ids": ids, "attention_mask": mask}, focus


def expand(inputs: dict, k: int) -> dict:
    """Each prompt row (and its image) repeated ``k`` times, as ``generate()`` expands them."""
    return {name: value.repeat_interleave(k, dim=0) for name, value in inputs.items()}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s position ids for a left-padded mask: counted from each row's first token."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def from_scratch(model, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Last-position logits (R, V) float32 of ``model`` over prompt + ``tokens`` (R, t): the prompt's
    prefill in a fresh cache, then all ``t`` tokens in one forward."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    pos = positions(mask)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, position_ids=pos[:, :length], use_cache=True)
        if tokens.shape[1] == 0:
            return out.logits[:, -1].float()
        cache = compat.output_cache(out)
        out = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=pos[:, length:],
            use_cache=True,
            **compat.with_cache(model, cache),
        )
    return out.logits[:, -1].float()


def generate_steps(model, inputs: dict, mode: dict, focus=None):
    """(logits per step (R, V), fed sequences per step (R, P + t)) of one ``generate()`` call."""
    recorder = Recorder()
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, pad_token_id=0, suppress_tokens=NEVER)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            **kwargs,
            **mode,
            output_logits=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([recorder]),
        )
    assert len(out.logits) == STEPS == len(recorder.fed)
    return [z.float() for z in out.logits], recorder.fed


def assert_logits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding; -inf (PAI's and AGLA's plausibility cuts) at the same places."""
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{what}: the plausibility cut differs"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


def check_every_step(model, handle, inputs, mode, focus=None):
    """generate()'s logits at every step == from scratch; returns the recomputed steps."""
    batch = inputs["input_ids"].shape[0]
    length = inputs["input_ids"].shape[1]
    with handle.focus(focus) if focus is not None else _nothing():
        steps, fed = generate_steps(model, inputs, mode)
    rows = fed[0].shape[0]
    k = rows // batch
    assert k == mode.get("num_beams", 1) * mode.get("num_return_sequences", 1)
    prompt = expand(inputs, k)
    recomputed = []
    for t, (logits, seqs) in enumerate(zip(steps, fed)):
        assert torch.equal(seqs[:, :length], prompt["input_ids"]), "generate() fed other prompt rows"
        with handle.focus(focus.repeat_interleave(k, dim=0)) if focus is not None else _nothing():
            want = from_scratch(model, prompt, seqs[:, length:])
        assert_logits_equal(logits, want, f"step {t}")
        recomputed.append(want)
    return recomputed, fed, k


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _differs(model, inputs, fed, steered, k, focus=None):
    """Effect size: the steered steps differ from the unsteered model's on the same sequences."""
    length = inputs["input_ids"].shape[1]
    prompt = expand(inputs, k)
    gaps = []
    for seqs, want in zip(fed, steered):
        base = from_scratch(model, prompt, seqs[:, length:])
        finite = torch.isfinite(want)
        gaps.append(float((want[finite] - base[finite]).abs().max()))
    assert min(gaps) > 1e-3, f"the recipe barely changes the logits (largest change per step {gaps})"


@pytest.mark.parametrize("name, mode", cases(VLM_RECIPES))
def test_vlm_generate_equals_from_scratch_at_every_step(llava, name, mode):
    inputs = vlm_inputs(llava)
    recipe = {"name": name, "interventions": VLM_RECIPES[name]}
    if mode == "static_cache" and name in NEEDS_DYNAMIC_CACHE:
        with attnsteer.apply(llava, recipe):
            with pytest.raises(SteeringError, match="static") as info:
                generate_steps(llava, inputs, MODES[mode])
        assert "Fix:" in str(info.value)
        return
    with attnsteer.apply(llava, recipe) as handle:
        steered, fed, k = check_every_step(llava, handle, inputs, MODES[mode])
        stats = handle.stats()
    assert all(s["fired"] > 0 for s in stats if s["method"] != "pai" or "gamma" not in name), stats
    _differs(llava, inputs, fed, steered, k)


@pytest.mark.parametrize("name, mode", cases(TEXT_RECIPES))
def test_text_generate_equals_from_scratch_at_every_step(llama, name, mode, request):
    inputs, focus = text_inputs()
    interventions = TEXT_RECIPES[name] or [request.getfixturevalue("seka_intervention")]
    recipe = {"name": name, "interventions": interventions}
    uses_focus = name.endswith("_focus")
    with attnsteer.apply(llama, recipe) as handle:
        steered, fed, k = check_every_step(llama, handle, inputs, MODES[mode], focus if uses_focus else None)
        stats = handle.stats()
    assert all(s["fired"] > 0 for s in stats), stats
    _differs(llama, inputs, fed, steered, k)


def _contrast(image_logits, text_logits, gamma):
    """PAI's logits step written out: gamma (log p_img - log p_text) + log p_text, -inf where
    p_img < 0.1 max p_img."""
    log_img = torch.log_softmax(image_logits, -1)
    log_text = torch.log_softmax(text_logits, -1)
    z = gamma * (log_img - log_text) + log_text
    cut = torch.softmax(image_logits, -1) < 0.1 * torch.softmax(image_logits, -1).max(-1, keepdim=True).values
    return z.masked_fill(cut, -math.inf)


def _text_only(inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Last-position logits input: the prompt without its image tokens (left-padded) + ``tokens``."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    keep = mask.bool() & (ids != IMAGE_TOKEN)
    rows = [torch.cat([ids[r][keep[r]], tokens[r]]) for r in range(ids.shape[0])]
    width = max(len(r) for r in rows)
    out_ids = torch.zeros(len(rows), width, dtype=ids.dtype)
    out_mask = torch.zeros(len(rows), width, dtype=mask.dtype)
    for r, row in enumerate(rows):
        out_ids[r, width - len(row) :] = row
        out_mask[r, width - len(row) :] = 1
    return out_ids, out_mask


@pytest.mark.parametrize("mode", ["greedy", "sample", "static_cache", "beams"])
def test_pai_gamma_under_generate_is_the_formula_of_two_independent_streams(llava, mode):
    """The contrast at every step, against the image stream with PAI's attention (gamma off, its
    own handle) and the unsteered text-only stream, each recomputed from scratch."""
    inputs = vlm_inputs(llava)
    gamma, alpha = 1.1, 0.5
    with attnsteer.apply(llava, {"interventions": [{"method": "pai", "params": {"alpha": alpha, "gamma": gamma}}]}):
        steps, fed = generate_steps(llava, inputs, MODES[mode])
    k = fed[0].shape[0] // inputs["input_ids"].shape[0]
    prompt = expand(inputs, k)
    length = prompt["input_ids"].shape[1]
    with attnsteer.apply(llava, {"interventions": [{"method": "pai", "params": {"alpha": alpha}}]}):
        image = [from_scratch(llava, prompt, seqs[:, length:]) for seqs in fed]
    text = []
    for seqs in fed:
        ids, mask = _text_only(prompt, seqs[:, length:])
        with torch.no_grad():
            text.append(llava(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1].float())
    for t, (got, img, txt) in enumerate(zip(steps, image, text)):
        want = _contrast(img, txt, gamma)
        assert_logits_equal(got, want, f"step {t}")
        finite = torch.isfinite(want)
        assert float((want[finite] - img[finite]).abs().max()) > 1e-2, "gamma changed nothing"


def test_pai_gamma_generate_logits_differ_from_gamma_off(llava):
    """The regression users hit: with gamma, generate()'s first-step logits were those of gamma off."""
    inputs = vlm_inputs(llava)
    got = {}
    for gamma in (None, 1.1):
        params = {"alpha": 0.5} | ({"gamma": gamma} if gamma else {})
        with attnsteer.apply(llava, {"interventions": [{"method": "pai", "params": params}]}):
            got[gamma] = generate_steps(llava, inputs, MODES["greedy"])[0]
    for off, on in zip(got[None], got[1.1]):
        assert not torch.equal(off, on)


@pytest.mark.parametrize("mode", ["beams", "return_sequences"])
def test_agla_refuses_expanded_prompts_before_any_work(llava, mode):
    from test_agla import PROCESSOR, agla

    inputs = vlm_inputs(llava)
    with attnsteer.apply(llava, agla(alpha=1.0), processor=PROCESSOR) as handle:
        with pytest.raises(SteeringError, match="num_beams=1 and num_return_sequences=1"):
            generate_steps(llava, inputs, MODES[mode])
        assert handle.report() == {}  # no augmented view was built


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_agla_generate_equals_from_scratch_at_every_step(llava, mode):
    """AGLA's two views through generate() against the same handle's fresh prefill + continuation
    (tests/test_agla.py checks each view against the unsteered model)."""
    from test_agla import PROCESSOR, agla

    inputs = vlm_inputs(llava)
    with attnsteer.apply(llava, agla(alpha=1.5, beta=0.5), processor=PROCESSOR) as handle:
        steered, fed, k = check_every_step(llava, handle, inputs, MODES[mode])
    _differs(llava, inputs, fed, steered, k)


def test_a_focus_mask_of_the_call_rows_follows_generates_expansion(llama):
    """handle.focus(mask) over the prompts given to generate() applies to every beam / returned
    sequence of each prompt; a mask of another shape is refused naming both shapes."""
    inputs, focus = text_inputs()
    recipe = {"interventions": TEXT_RECIPES["pai_gamma_focus"]}
    with attnsteer.apply(llama, recipe) as handle:
        with handle.focus(focus[:, :-1]):
            with pytest.raises(SteeringError, match=r"\(2, 13\).*\(4, 14\)"):
                generate_steps(llama, inputs, MODES["beams"])
