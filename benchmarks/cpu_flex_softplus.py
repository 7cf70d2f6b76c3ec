"""Softplus re-weighting as a FlexAttention score_mod on CPU, against the fused backend's path.

The re-weighting ``softmax(p log max(N_i exp(s_ij - lse_i) - o_i, 0))`` can run as a ``score_mod``
with the row LSE, N_i and o_i as per-row inputs (compiled by torch.compile / inductor). This
script times it on one SmolLM2-shaped layer (9 query / 3 kv heads, head dim 64, random inputs)
next to what ``attnsteer``'s CPU fused path does (PyTorch's flash kernel for the LSE, then one
chunked re-weighting pass), checks both against the float64 formula, and prints a JSON line.

    .venv/bin/python benchmarks/cpu_flex_softplus.py --len 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnsteer.attention import flash_cpu, router
    from attnsteer.attention.flash_cpu import flash_with_lse, visible_counts
    from attnsteer.attention.geometry import AttentionCall, ForwardInfo, MaskView
    from attnsteer.context import PromptState
    from attnsteer.kernels.ops import MaskSpec
    from attnsteer.methods.softplus import SoftplusReweight
    from attnsteer.plan import LayerPlan

    n, hq, hkv, d, p = args.len, 9, 3, 64, 3.0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for h in (hq, hkv, hkv))
    scale = d**-0.5
    spec = MaskSpec(0)
    _, lse = flash_with_lse(q, k, v, spec, scale)
    rows = torch.arange(n)
    n_vis = visible_counts(spec, 1, rows).view(n)
    offset = torch.where(rows < 3, 0.0, 1.0)
    shift = (lse - torch.log(n_vis)).contiguous()  # N_i a_ij = exp(s_ij - shift_i)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)

    def score_mod(score, b, h, qi, kv):
        x = torch.exp(score - shift[b, h, qi]) - offset[qi]
        return torch.where(x > 0, p * torch.log(x.clamp(min=1e-38)), -float("inf"))

    block = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, n, n, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    t0 = time.perf_counter()
    out_flex = flex(q, kr, vr, score_mod=score_mod, block_mask=block, scale=scale)
    compile_s = time.perf_counter() - t0

    plan = LayerPlan(0)
    plan.methods.append(SoftplusReweight({"p": p, "offset": 1.0, "scoring": "softmax"}, 0, None))

    class _Stats:
        def record(self, *_):
            pass

    steps = plan.steps(True)
    call = AttentionCall(0, ForwardInfo(n, 0, n, None), q, k, MaskView(None, n, n), scale, PromptState())
    assert router.refusal("flash", router.BackendConfig("flash"), steps, call) is None

    def ours():
        return flash_cpu.run(steps, call, q, k, v, _Stats())

    def timed(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] * 1e3

    s = (q.double() @ kr.double().transpose(-1, -2) * scale).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")
    )
    a = torch.softmax(s, -1)
    w = (n_vis.double().view(1, 1, -1, 1) * a - offset.double().view(1, 1, -1, 1)).clamp(min=0) ** p
    want = (w / w.sum(-1, keepdim=True)) @ vr.double()
    result = {
        "len": n,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "flex_compile_s": compile_s,
        "flex_ms": timed(lambda: flex(q, kr, vr, score_mod=score_mod, block_mask=block, scale=scale)),
        "flash_kernel_ms": timed(lambda: flash_with_lse(q, k, v, spec, scale)),
        "attnsteer_softplus_ms": timed(ours),
        "flex_max_err": float((out_flex.double() - want).abs().max()),
        "attnsteer_max_err": float((ours().transpose(1, 2).double() - want).abs().max()),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
