"""Initialising a LookupFFN from the dense FFN it replaces.

- :mod:`.layer`: options (:class:`~.layer.DistillOptions`), the per-layer fit and the
  conversion-time driver;
- :mod:`.model`: whole-model distillation on the original model's outputs;
- :mod:`.calibration`, :mod:`.calibration_text`: calibration inputs (tensors, the user's
  sentences or the standard library's docstrings);
- :mod:`.checkpoint`: atomic checkpoints and resume;
- :mod:`.distributed`: the same on several processes.
"""
