"""Building, caching and running the kernels behind the ``lookupc`` custom ops.

- :mod:`.build`: building the forward CPU kernels (memory and disk cache, export to a
  shared library and loading it back, MetaSchedule tuning);
- :mod:`.compiled`: :class:`~.compiled.Kernels`, a built hash/gather pair called on torch
  tensors;
- :mod:`.cpu`: the forward kernel providers ``naive``/``cpu``/``tuned``, registered with
  :mod:`lookupc.dispatch` on import;
- :mod:`.cpu_training`: the backward on CPU tensors;
- :mod:`.cuda`: the ``cuda`` provider (forward and backward), and its CPU emulation;
- :mod:`.training`: the build-once cache and glue the two backward providers share.

Every provider implements :class:`lookupc.dispatch.KernelProvider`.
"""
