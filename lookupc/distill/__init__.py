"""Initialising a LookupFFN from the dense FFN it replaces.

- :mod:`.options`: :class:`~.options.DistillOptions`;
- :mod:`.layer`: the per-layer fit and the conversion-time driver, with its phases
  :mod:`.hash_fit` (the hash) and :mod:`.table_solve` (the tables);
- :mod:`.model`: whole-model distillation on the original model's outputs, with its
  objective in :mod:`.objective`;
- :mod:`.calibration`, :mod:`.calibration_text`: calibration inputs (tensors, the user's
  sentences or the standard library's docstrings) and capturing activations;
- :mod:`.checkpoint`: atomic checkpoints and resume;
- :mod:`.distributed`: the same on several processes.
"""
