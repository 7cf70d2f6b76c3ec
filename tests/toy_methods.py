"""Toy methods, one rule of each kind each, for tests/test_extending.py and tests/test_vllm.py.

Importing this module registers them (``@register``), as importing a method module does; a vLLM
engine imports it in every process when ``ATTNSTEER_METHODS=toy_methods`` is set (tests/ on the
path). Each toy has one parameter ``c`` (1 is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsteer.methods.base import Method, param, register
from attnsteer.methods.rules import GroupRule, HeadRule, KeyRule, KeyScaleRule, ModelStep, ReweightRule, ScoreRule


@dataclass(frozen=True)
class ToyParams:
    """The toy methods' parameter: type (annotation), default, help and range in one place."""

    c: float = param(2.0, "the toy's strength (1 is the identity)", low=0.0, low_open=True, high=100.0)


class Temperature(ScoreRule):
    """``s <- s / c`` on the steered heads."""

    def modify(self, s):
        return s / self.method.p.c


class FirstKeyTemperature(KeyScaleRule):
    """``s <- c s`` on each row's scores of the first prompt token, in rows at positions >= 3 (a
    rule of the ``key_scale`` form)."""

    def key_scales(self, key_abs, prompt):
        return torch.where(key_abs == 0, self.method.p.c, 1.0).view(1, -1)

    def row_gate(self, rows, prompt):
        return rows.row_abs >= 3


class FirstTokenMass(GroupRule):
    """Group 1: each row's first real token; a row keeps ``1 / c`` of its mass there, the rest goes
    to the other keys in proportion."""

    num_groups = 2

    def group_table(self, prompt):
        return prompt.get(self.key, "first").view(torch.int8).unsqueeze(1)  # (B, 1, P)

    def factors(self, masses, prompt):
        keep = 1.0 / self.method.p.c
        m_rest, m_first = masses[..., :1], masses[..., 1:2]
        steered = (m_first > 0) & (m_rest > 0)
        return steered, torch.cat(
            [1 + (1 - keep) * m_first / m_rest.clamp(min=1e-30), torch.full_like(m_rest, keep)], -1
        )


class HalfHeadZero(HeadRule):
    """Head 0's output divided by ``c`` at every position."""

    def apply(self, out, call, prompt):
        scale = torch.ones(out.shape[2], dtype=out.dtype, device=out.device)
        scale[0] = 1.0 / self.method.p.c
        return out * scale.view(1, 1, -1, 1), out.shape[0] * out.shape[1]


class FirstKeyScale(KeyRule):
    """The first prompt token's keys multiplied by ``c`` before RoPE."""

    def edit(self, keys, positions, prompt):
        first = (positions == 0).view(1, -1, 1, 1).to(keys.dtype)  # (1, T, 1, 1)
        return keys * (1 + (self.method.p.c - 1) * first), int(first.sum()) * keys.shape[0]


class LogitTemperature(ModelStep):
    """The next-token logits divided by ``c`` after every forward."""

    def after_model(self, state, model, bound, output, is_prefill):
        output.logits = output.logits / self.method.p.c


def toy(name: str, rules, **facts):
    """A method class stating ``rules`` (rule classes, or callables method -> rule); ``facts``: class
    attributes (and methods) it declares."""

    class Toy(Method):
        docs = "docs/extending.md#adding-a-method"
        citation = "attnsteer test suite"
        default_layers = "1:"
        Params = ToyParams

        @classmethod
        def is_identity_params(cls, params) -> bool:
            return params["c"] == 1.0

        def build_rules(self):
            return [rule(self) for rule in rules]

    Toy.name = name
    for key, value in facts.items():
        setattr(Toy, key, value)
    return Toy


def _first_tokens(self, hidden, valid, prompt):
    """toy_group's prerequisite, at prefill: each row's first real token (bool (B, P)), kept in the
    prompt's state (where its groups come from)."""
    first = torch.zeros_like(valid)
    first[torch.arange(valid.shape[0]), valid.int().argmax(-1)] = True
    prompt.put(self.key, "first", first & valid)


TOYS = {
    "toy_score": toy("toy_score", [Temperature]),
    "toy_key_scale": toy("toy_key_scale", [FirstKeyTemperature]),
    "toy_group": toy("toy_group", [FirstTokenMass], reads_layer_input=True, observe_layer_input=_first_tokens),
    "toy_reweight": toy("toy_reweight", [lambda m: ReweightRule(m, m.p.c, 0.0, 0)]),
    "toy_head": toy("toy_head", [HalfHeadZero]),
    "toy_key": toy("toy_key", [FirstKeyScale]),
    "toy_logits": toy("toy_logits", [LogitTemperature]),
}

for _cls in TOYS.values():
    register(_cls)  # the "one registry line" of each
