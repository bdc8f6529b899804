"""lookupc composed with dynamic int8 quantization of the rest of the model."""

import pytest
import torch
from torch import nn

import lookupc
from lookupc.artifact.model_io import load_model
from lookupc.compose import quantize_rest


def test_int8_rest_keeps_lookup_ffns_and_quantizes_the_other_linears():
    loaded = load_model("examples.tiny_bert:factory", batch=2, seq_len=8)
    result = lookupc.convert(loaded.module, loaded.example_inputs)
    mixed = quantize_rest(result.module, "int8")
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in mixed.modules()}
    assert any("quantized" in k and k.endswith("Linear") for k in kinds)
    assert not any(type(m) is nn.Linear for m in mixed.modules())  # every Linear quantized
    assert sum(isinstance(m, lookupc.LookupFFN) for m in mixed.modules()) == 2
    assert any(type(m) is nn.Linear for m in result.module.modules())  # original untouched
    with torch.no_grad(), lookupc.set_schedule("cpu"):
        want = result.module(*loaded.example_inputs)
        got = mixed(*loaded.example_inputs)
    cos = torch.nn.functional.cosine_similarity(got.mean(1), want.mean(1), dim=-1)
    assert cos.min() > 0.99, cos


def test_bad_rest_dtype_is_a_clear_error():
    with pytest.raises(lookupc.LookupcInputError, match="rest dtype"):
        quantize_rest(nn.Linear(2, 2), "int4")
