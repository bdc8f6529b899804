"""Attention memoization (AttMemo): everything but the graph pass itself.

The pass (``lookupc.passes.attention_memo``: ``MemoizeAttention``, ``apply_memo``) wraps
self-attention modules so they consult a database; this package holds that database,
how it is built and what decides when to use it:

- :mod:`.attention`: which modules are memoizable, the wrapper ``MemoSelfAttention`` (hit
  path, serving, per-layer stats) and the model fingerprint;
- :mod:`.apm`: the attention-probability-matrix math the build and the hit path share;
- :mod:`.build`: ``build_memo_db``, with :mod:`.capture` (what runs through the model);
- :mod:`.plan`: which (layer, length) buckets to memoize (eq. 3);
- :mod:`.store`: APMs in memory-mapped files, keys in faiss;
- :mod:`.embed`: the siamese embedding of a layer's input;
- :mod:`.calib`: the calibrated mapping from predicted to true similarity;
- :mod:`.perf`: the per-layer performance model (eq. 3) and threshold presets;
- :mod:`.data`: inputs (a local encoder, packed or padded text, token edits).
"""
