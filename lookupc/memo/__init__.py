"""Attention memoization (AttMemo): everything but the graph pass itself.

The pass (``lookupc.passes.attention_memo``) rewrites self-attention to consult a
database; this package holds that database and what decides when to use it:

- :mod:`.store`: APMs in memory-mapped files, keys in faiss;
- :mod:`.embed`: the siamese embedding of a layer's input;
- :mod:`.calib`: the calibrated mapping from predicted to true similarity;
- :mod:`.perf`: the per-layer performance model (eq. 3) and threshold presets;
- :mod:`.data`: inputs (a local encoder, packed or padded text, token edits).
"""
