"""CUDA schedules of the forward (``hash``, ``gather``) and backward kernels, and their
shared helpers (``util``)."""
