"""lookupc.fidelity.measure: pooled cosine over real tokens, padding excluded."""

import torch

from lookupc.fidelity import measure


class Enc(torch.nn.Module):
    """[batch, seq, d] -> [batch, seq, d]; ``flip`` changes only what padding tokens give."""

    def __init__(self, flip: bool):
        super().__init__()
        self.flip = flip

    def forward(self, x, attention_mask=None):
        if self.flip and attention_mask is not None:
            pad = (attention_mask == 0).unsqueeze(-1)
            return torch.where(pad, -100.0 * x, x)
        return x


def test_padding_tokens_do_not_enter_the_pooled_cosine():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    f = measure(Enc(False), Enc(True), (x,), {"attention_mask": mask})
    assert f["cosine_min"] > 0.999  # the outputs differ only at padding
    # the control: pooled over every token, the padded row would look far off
    plain = torch.nn.functional.cosine_similarity(x.mean(1), Enc(True)(x, mask).mean(1), dim=-1)
    assert plain[0] < 0.9 and plain[1] > 0.999
