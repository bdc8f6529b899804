"""Building, caching and running the kernels behind the ``lookupc`` custom ops.

- :mod:`.cpu`: the forward kernel providers ``naive``/``cpu``/``tuned`` (build, cache,
  export to a library), registered with :mod:`lookupc.dispatch`;
- :mod:`.cpu_training`: the backward on CPU tensors;
- :mod:`.cuda`: the ``cuda`` provider (forward and backward), and its CPU emulation;
- :mod:`.training`: the build-once cache and glue the two backward providers share.

Every provider implements :class:`lookupc.dispatch.KernelProvider`.
"""
