"""Small models the CLI tests compile: a tiny HF BERT saved with save_pretrained."""

from pathlib import Path


def make_hf_bert(path: Path) -> Path:
    """Save a 2-layer BERT (hidden 64, FFN 256, vocab 100) with safetensors into ``path``."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    assert any(Path(path).glob("*.safetensors"))
    return Path(path)
