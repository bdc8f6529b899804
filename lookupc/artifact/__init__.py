"""The deployable artifact and the model and text formats around it.

- :mod:`.core`: the on-disk format, :func:`~.core.load` and the compile driver;
- :mod:`.model_io`: reading models and inputs, writing ``torch.export`` programs;
- :mod:`.pt2_safety`, :mod:`.signing`: what may run when an artifact is loaded;
- :mod:`.output_check`: is an artifact's output the converted model's;
- :mod:`.text_io`, :mod:`.st_format`, :mod:`.st_export`: text in, embeddings out, and
  sentence-transformers models.
"""
