"""LookupFFN as PyTorch custom ops in the ``lookupc`` namespace.

Two forward ops, not one fused op: the hash is compute-bound (BH4 block matmuls
and Hadamard butterflies) and the gather is memory-bound (random table rows), so
they are lowered, scheduled and tuned as two separate TensorIR kernels; their
interface (int32 codes and float scores, [N, h] each) is tiny compared with
either side's traffic, so fusing them would save nothing measurable.

- ``lookupc::hash(x, weight, hash_bias, decay, bits) -> (scores, codes)``: the
  differentiable output comes first (float scores, then int32 codes)
- ``lookupc::gather(codes, scores, tables, bias) -> y``
- ``lookupc::gather_quantized(codes, scores, tables, scale, bias) -> y``: the gather on
  bfloat16 or int8 tables (``scale``: int8 row scales [tables, rows], None for bfloat16);
  inference only: its backward raises (train float32 tables, quantise afterwards)
- ``lookupc::hash_backward`` and ``lookupc::gather_backward``: the gradients, as ops too
  so that exported/compiled training graphs keep them as single nodes.

Inputs may have any leading shape ``[..., d]`` and any strides; float32 and float64
are supported (all float arguments of one call share a dtype and a device). The
forward and backward run the provider selected by :func:`lookupc.set_schedule` (see
``lookupc.dispatch``: the PyTorch reference on CPU by default); a provider without
backward kernels gets the reference math for the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref
from .dispatch import provider_for
from .errors import LookupcInputError

__all__ = ["hash", "gather", "gather_quantized"]

_FLOATS = (torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


def _fail(op: str, msg: str) -> None:
    raise LookupcInputError(f"lookupc.{op}: {msg}")


def _check_float(op: str, name: str, t: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        _fail(op, f"argument {name!r} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        _fail(op, f"argument {name!r} must be float32 or float64, got {t.dtype}")
    if like is not None and t.dtype != like.dtype:
        _fail(op, f"argument {name!r} has dtype {t.dtype} but x/scores have {like.dtype}")
    if like is not None and t.device != like.device:
        _fail(op, f"argument {name!r} is on {t.device} but x/scores are on {like.device}")


def _check_hash(x: Tensor, weight: Tensor, hash_bias: Tensor, decay: float, bits: int) -> int:
    """Validate the hash op's arguments; return the number of tables h."""
    op = "hash"
    _check_float(op, "x", x)
    _check_float(op, "weight", weight, x)
    _check_float(op, "hash_bias", hash_bias, x)
    if x.dim() < 1:
        _fail(op, "argument 'x' must have at least one dim [..., d_in]")
    if weight.dim() != 5 or weight.shape[3] != weight.shape[4]:
        _fail(op, f"argument 'weight' must be [repeats, rounds, blocks, bs, bs], "
                  f"got {tuple(weight.shape)}")
    bs = weight.shape[3]
    width = weight.shape[2] * bs
    if bs < 1 or width & (width - 1):
        _fail(op, f"argument 'weight' must span a power-of-two width, got {width}")
    if x.shape[-1] > width:
        _fail(op, f"argument 'x' has {x.shape[-1]} features but 'weight' spans only {width}")
    if not 1 <= int(bits) <= 16:
        _fail(op, f"argument 'bits' must be in 1..16, got {bits}")
    if hash_bias.dim() != 1 or hash_bias.shape[0] % bits:
        _fail(op, f"argument 'hash_bias' must be 1-D of length tables*bits, got "
                  f"{tuple(hash_bias.shape)} with bits={bits}")
    if hash_bias.shape[0] > weight.shape[0] * width:
        _fail(op, f"argument 'weight' has {weight.shape[0]} repeats of width {width}, too few "
                  f"for {hash_bias.shape[0]} code coordinates")
    if not 0.0 <= decay <= 1.0:
        _fail(op, f"argument 'decay' must be in [0, 1], got {decay}")
    return hash_bias.shape[0] // bits


def _check_gather(codes: Tensor, scores: Tensor, tables: Tensor, bias: Tensor) -> None:
    op = "gather"
    if not isinstance(codes, Tensor) or codes.dtype not in _INTS:
        _fail(op, f"argument 'codes' must be an int32/int64 Tensor, got "
                  f"{getattr(codes, 'dtype', type(codes).__name__)}")
    _check_float(op, "scores", scores)
    _check_float(op, "tables", tables, scores)
    _check_float(op, "bias", bias, scores)
    if codes.device != scores.device:
        _fail(op, f"argument 'codes' is on {codes.device} but 'scores' is on {scores.device}")
    if tables.dim() != 3:
        _fail(op, f"argument 'tables' must be [tables, rows, d_out], got {tuple(tables.shape)}")
    h, rows, d_out = tables.shape
    if rows & (rows - 1):
        _fail(op, f"argument 'tables' must have a power-of-two row count, got {rows}")
    if codes.shape != scores.shape:
        _fail(op, f"arguments 'codes' {tuple(codes.shape)} and 'scores' "
                  f"{tuple(scores.shape)} must have the same shape")
    if codes.dim() < 1 or codes.shape[-1] != h:
        _fail(op, f"argument 'codes' must end in the table count {h}, got {tuple(codes.shape)}")
    if bias.shape != (d_out,):
        _fail(op, f"argument 'bias' must have shape ({d_out},), got {tuple(bias.shape)}")


def _check_gather_quantized(codes: Tensor, scores: Tensor, tables: Tensor,
                            scale: Tensor | None, bias: Tensor) -> None:
    op = "gather_quantized"
    if not isinstance(tables, Tensor) or tables.dtype not in (torch.bfloat16, torch.int8):
        _fail(op, f"argument 'tables' must be a bfloat16 or int8 Tensor (float32 tables use "
                  f"lookupc.gather), got {getattr(tables, 'dtype', type(tables).__name__)}")
    if tables.dtype == torch.int8:
        if not isinstance(scale, Tensor) or scale.dtype != torch.float32:
            _fail(op, "int8 tables need a float32 'scale' Tensor [tables, rows]")
        if tuple(scale.shape) != tuple(tables.shape[:2]):
            _fail(op, f"argument 'scale' must have shape {tuple(tables.shape[:2])}, got "
                      f"{tuple(scale.shape)}")
    elif scale is not None:
        _fail(op, "bfloat16 tables take no 'scale' (pass None)")
    if tables.device != scores.device:
        _fail(op, f"argument 'tables' is on {tables.device} but 'scores' is on {scores.device}")
    _check_gather(codes, scores, scores.new_empty(tables.shape), bias)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


@torch.library.custom_op("lookupc::hash", mutates_args=())
def hash(x: Tensor, weight: Tensor, hash_bias: Tensor, decay: float,
         bits: int) -> tuple[Tensor, Tensor]:
    """BH4 hash of ``x`` [..., d_in]: float scores and int32 codes, each [..., tables]."""
    h = _check_hash(x, weight, hash_bias, decay, bits)
    lead = x.shape[:-1]
    provider = provider_for(x.device, x.dtype)
    codes, scores = provider.hash(_flat(x), weight.contiguous(), hash_bias.contiguous(),
                                  float(decay), int(bits))
    return scores.reshape(*lead, h), codes.reshape(*lead, h)


@hash.register_fake
def _(x, weight, hash_bias, decay, bits):
    h = _check_hash(x, weight, hash_bias, decay, bits)
    shape = (*x.shape[:-1], h)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("lookupc::gather", mutates_args=())
def gather(codes: Tensor, scores: Tensor, tables: Tensor, bias: Tensor) -> Tensor:
    """Score-weighted sum of table rows plus bias: [..., tables] -> [..., d_out]."""
    _check_gather(codes, scores, tables, bias)
    lead = codes.shape[:-1]
    provider = provider_for(scores.device, scores.dtype)
    y = provider.gather(_flat(codes).to(torch.int32), _flat(scores), tables.contiguous(),
                        bias.contiguous())
    return y.reshape(*lead, tables.shape[-1])


@gather.register_fake
def _(codes, scores, tables, bias):
    _check_gather(codes, scores, tables, bias)
    return scores.new_empty((*codes.shape[:-1], tables.shape[-1]))


@torch.library.custom_op("lookupc::gather_quantized", mutates_args=())
def gather_quantized(codes: Tensor, scores: Tensor, tables: Tensor, scale: Tensor | None,
                     bias: Tensor) -> Tensor:
    """:func:`gather` on bfloat16 or int8 tables (int8: ``row = scale * q``); float32 sums."""
    _check_gather_quantized(codes, scores, tables, scale, bias)
    lead = codes.shape[:-1]
    provider = provider_for(scores.device, scores.dtype)
    impl = getattr(provider, "gather_quantized", ref.gather_forward_quantized)
    y = impl(_flat(codes).to(torch.int32), _flat(scores), tables.contiguous(),
             None if scale is None else scale.contiguous(), bias.contiguous())
    return y.reshape(*lead, tables.shape[-1])


@gather_quantized.register_fake
def _(codes, scores, tables, scale, bias):
    _check_gather_quantized(codes, scores, tables, scale, bias)
    return scores.new_empty((*codes.shape[:-1], tables.shape[-1]))


def _gather_quantized_bwd(ctx, grad_y):
    from .errors import LookupcError

    raise LookupcError(
        "lookupc.gather_quantized has no backward: bfloat16/int8 tables are for inference. "
        "Train (or distill) with table_dtype='float32' and quantise afterwards "
        "(LookupFFN.quantize_tables, or convert/compile with --table-dtype)")


def _gather_quantized_setup(ctx, inputs, output):
    pass


gather_quantized.register_autograd(_gather_quantized_bwd, setup_context=_gather_quantized_setup)


@torch.library.custom_op("lookupc::hash_backward", mutates_args=())
def hash_backward(grad_scores: Tensor, x: Tensor, weight: Tensor, hash_bias: Tensor,
                  decay: float, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the hash's scores w.r.t. x, weight and hash_bias."""
    impl = getattr(provider_for(x.device, x.dtype), "hash_backward", ref.hash_backward)
    g_x, g_w, g_b = impl(_flat(grad_scores), _flat(x), weight.contiguous(),
                         hash_bias.contiguous(), float(decay), int(bits))
    return g_x.reshape(x.shape), g_w, g_b


@hash_backward.register_fake
def _(grad_scores, x, weight, hash_bias, decay, bits):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(hash_bias)


@torch.library.custom_op("lookupc::gather_backward", mutates_args=())
def gather_backward(grad_y: Tensor, codes: Tensor, scores: Tensor,
                    tables: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of the gather w.r.t. scores and tables (bias: the sum of grad_y)."""
    impl = getattr(provider_for(scores.device, scores.dtype), "gather_backward",
                   ref.gather_backward)
    g_s, g_t = impl(_flat(grad_y), _flat(codes), _flat(scores), tables.contiguous())
    return g_s.reshape(scores.shape), g_t


@gather_backward.register_fake
def _(grad_y, codes, scores, tables):
    return torch.empty_like(scores), torch.empty_like(tables)


def _hash_setup(ctx, inputs, output):
    x, weight, hash_bias, decay, bits = inputs
    ctx.save_for_backward(x, weight, hash_bias)
    ctx.decay, ctx.bits = decay, bits


def _hash_bwd(ctx, grad_scores, grad_codes):
    x, weight, hash_bias = ctx.saved_tensors
    g_x, g_w, g_b = torch.ops.lookupc.hash_backward(grad_scores, x, weight, hash_bias,
                                                    ctx.decay, ctx.bits)
    return g_x, g_w, g_b, None, None


hash.register_autograd(_hash_bwd, setup_context=_hash_setup)


def _gather_setup(ctx, inputs, output):
    codes, scores, tables, bias = inputs
    ctx.save_for_backward(codes, scores, tables)


def _gather_bwd(ctx, grad_y):
    codes, scores, tables = ctx.saved_tensors
    # The bias gradient (a torch reduction) first: the hash backward usually runs next, and
    # a torch op between the two would wake torch's OpenMP pool, whose spinning threads
    # then hold a core the compiled hash backward wants (see lookupc.tvm_shim).
    g_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    g_s, g_t = torch.ops.lookupc.gather_backward(grad_y, codes, scores, tables)
    return None, g_s, g_t, g_bias


gather.register_autograd(_gather_bwd, setup_context=_gather_setup)
