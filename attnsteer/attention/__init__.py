"""The attention function attnsteer registers with transformers and its two compute backends.

* :mod:`.reference` -- float32 eager oracle, materialised weights, formulas of docs/methods.md applied literally;
* :mod:`.fused` -- O(N) memory path: query chunks against all keys, group masses / log-sum-exp,
  never a queries x keys tensor;
* :mod:`.dispatch` -- the function transformers calls; routes each layer to its plan or to the
  model's own implementation.
"""
