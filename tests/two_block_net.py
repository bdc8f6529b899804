"""A small residual two-block model (LayerNorm, Linear-GELU-Linear) for distillation tests."""

from torch import nn


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.blocks = nn.Sequential(Block(d), Block(d))

    def forward(self, x):
        return self.blocks(x)
