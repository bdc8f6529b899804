import pytest

from lookupc import LookupConfig, LookupFFN
from lookupc.config import num_repeats, padded_width


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"bits": 2.5}, "bits"),
    ({"tables": 0}, "tables"), ({"tables": -3}, "tables"),
    ({"block_size": 48}, "block_size"), ({"block_size": 0}, "block_size"),
    ({"decay": 1.5}, "decay"),
])
def test_invalid_values_name_field_and_value(kwargs, field):
    with pytest.raises(ValueError) as err:
        LookupConfig(**kwargs)
    msg = str(err.value)
    assert field in msg and repr(next(iter(kwargs.values()))) in msg


def test_block_larger_than_padded_width():
    cfg = LookupConfig(tables=4, bits=4, block_size=128)
    with pytest.raises(ValueError, match="block_size=128.*padded input width 64"):
        LookupFFN(40, 8, cfg)


def test_frozen():
    cfg = LookupConfig()
    with pytest.raises(Exception):
        cfg.bits = 4


def test_defaults_follow_paper():
    assert LookupConfig.for_ffn(512, 2048, 512) == LookupConfig(128, 8, 64)
    minilm = LookupConfig.for_ffn(384, 1536, 384)
    assert (minilm.tables, minilm.bits, minilm.block_size) == (96, 8, 64)
    assert LookupConfig.for_ffn(20, 80).block_size == 32


def test_derived_sizes():
    assert padded_width(384) == 512 and padded_width(512) == 512 and padded_width(1) == 1
    assert num_repeats(512, 128, 8) == 2
    assert num_repeats(384, 96, 8) == 2
    assert num_repeats(64, 4, 4) == 1


def test_distillation_defaults_are_one_bit_tables_one_per_input_feature():
    from lookupc.config import LookupConfig, SizeOverride, lookup_flops

    cfg = LookupConfig.for_distill(384, 1536)
    assert (cfg.tables, cfg.bits, cfg.block_size) == (512, 1, 32)
    dense = 2 * 384 * 1536 * 2 + 1536 + 384
    assert dense / sum(lookup_flops(384, 384, cfg)) > 4.0  # MiniLM: 4.3x fewer FLOPs
    assert LookupConfig.for_distill(20, 80).block_size == 32
    assert LookupConfig.for_distill(8, 32) == LookupConfig(tables=8, bits=1, block_size=8)
    assert SizeOverride(bits=2, distill=True).for_ffn(384, 1536) == LookupConfig(
        tables=512, bits=2, block_size=32)
