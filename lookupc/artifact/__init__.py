"""The deployable artifact and the model and text formats around it.

- :mod:`.format`: the on-disk format (manifest, files, hashes, verifying);
- :mod:`.load`: :func:`~.load.load` and the loaded :class:`~.load.Artifact`;
- :mod:`.graph`: the LookupFFNs of a converted model (kernel shapes, configs);
- :mod:`.compile`: the compile driver (:func:`~.compile.compile_artifact`);
- :mod:`.model_load`: reading a MODEL argument (Hugging Face, sentence-transformers, ``.pt2``,
  factories, pickles) with its example inputs;
- :mod:`.export`: writing ``torch.export`` programs (outputs flattened, their names kept);
- :mod:`.tensor_files`: input and output tensor files;
- :mod:`.pt2_safety`, :mod:`.signing`: what may run when an artifact is loaded;
- :mod:`.output_check`: is an artifact's output the converted model's;
- :mod:`.text_io`, :mod:`.st_format`, :mod:`.st_export`: text in, embeddings out, and
  sentence-transformers models.
"""
