"""BatchNorm folding (omse.transforms.fold): the folded weights equal the closed form, the model's
function is unchanged, and only pairs the trace proves are folded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omse.errors import OmseError
from omse.transforms.fold import fold_batchnorm


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


def test_folded_weights_equal_the_closed_form():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = _bn(4, 1)
    model = nn.Sequential(conv, bn).eval()
    w, mean, var, gamma, beta = (
        conv.weight.detach().clone(),
        bn.running_mean.clone(),
        bn.running_var.clone(),
        bn.weight.detach().clone(),
        bn.bias.detach().clone(),
    )
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_batchnorm(model, x)
    assert pairs == [("0", "1")]
    assert isinstance(model[1], nn.Identity)
    inv = gamma / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(model[0].weight, w * inv.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(model[0].bias, beta - mean * inv)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_linear_with_bias_and_batchnorm1d():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(lin, bn).eval()
    x = torch.randn(6, 5)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model, x) == [("0", "1")]
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


class SharedInput(nn.Module):
    """The BatchNorm's input is also read by the skip path: folding would change the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = _bn(3, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_batchnorm_whose_input_is_read_elsewhere_is_refused():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(OmseError, match="fold_bn=False"):
        fold_batchnorm(SharedInput().eval(), x)


class Twice(nn.Module):
    """One conv called twice: its output is not one tensor, nothing is folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = _bn(3, 3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


def test_layers_called_twice_and_lone_batchnorms_stay():
    x = torch.randn(2, 3, 4, 4)
    m = Twice().eval()
    assert fold_batchnorm(m, x) == []
    assert isinstance(m.bn, nn.BatchNorm2d)
    lone = nn.Sequential(_bn(3, 4), nn.Conv2d(3, 3, 1)).eval()
    assert fold_batchnorm(lone, x) == []
