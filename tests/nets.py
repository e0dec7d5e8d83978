"""Small models shared by the tests."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-BN-ReLU -> depthwise conv-BN-ReLU6 -> pointwise conv-BN -> pool -> Linear."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = nn.ReLU6()
        self.pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.dw(x)))
        x = self.bn3(self.pw(x))
        return self.fc(x.mean((2, 3)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    m = TinyNet()
    for bn in (m.bn1, m.bn2, m.bn3):  # non-trivial BN statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def tiny_batches(n: int = 4, bs: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 12, 12, generator=g) for _ in range(n)]


class Collapsing(nn.Module):
    """A branch whose 4-bit weights wreck the output: one huge weight per kernel makes a 4-bit
    step that rounds every other weight to zero. The branch holds 80% of the weights, so a
    budget of 0.6x the 8-bit bytes cannot give it 8 bits: only the guard can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 256)
        self.head = nn.Linear(288, 4)
        with torch.no_grad():
            self.b.weight.normal_(0, 0.2)
            self.b.weight[:, 0] = 6.0

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))
