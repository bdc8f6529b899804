"""The LookupFFN kernels as TensorIR, before any schedule or build.

Phase 1 of the lowering pipeline (frontend -> op -> **kernels** -> schedules -> runtime
-> artifact):

- :mod:`.shapes`: :class:`~.shapes.KernelShapes`, the sizes that fix one pair of kernels;
- :mod:`.forward`: the hash (BH4 rounds, Hadamard butterflies, codes and scores) and
  the gather, per table dtype;
- :mod:`.fold`: :func:`~.fold.fold_weight`, the hash weight with the BS-wide Hadamard
  folded into its blocks (the layout the ``fold=True`` hash takes);
- :mod:`.backward`: the training kernels (scheduled for CUDA and the CPU);
- :mod:`.backward_cpu`: the backward PrimFuncs in the shapes the CPU runs fastest.

Schedules live in ``lookupc.schedules``; building, caching and calling the kernels in
``lookupc.runtime``.
"""
