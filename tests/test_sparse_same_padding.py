"""Sparse deltas on convolutions that pad in their own forward (TF "same" padding, as in the
packaged EfficientNet-Lite0 and timm's Conv2dSame): ΔW must see the padded input too."""
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt


class SamePad(nn.Conv2d):
    """TF "same" at stride 2: one extra row/column at the bottom/right, padded in forward."""

    def forward(self, x):
        return self._conv_forward(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias)


def test_sparse_delta_on_a_self_padding_conv_equals_the_merged_weight():
    torch.manual_seed(0)
    net = nn.Sequential(SamePad(3, 4, 3, stride=2), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    ref = SamePad(3, 4, 3, stride=2)
    ref.load_state_dict(net[0].state_dict())
    m = dt.attach(net, "sparse", selection={"0": torch.tensor([0, 5, 17, 40])})
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.tensor([0.5, -0.3, 0.2, 0.9]))
    y = m(x)  # (2, 4, 4, 4): 8 px + 1 pad, 3×3 at stride 2
    with torch.no_grad():  # the merged reference: W + ΔW in the same self-padding conv
        ref.weight.view(-1)[torch.tensor([0, 5, 17, 40])] += torch.tensor([0.5, -0.3, 0.2, 0.9])
    torch.testing.assert_close(y, torch.relu(ref(x)))
