"""Capture by module name with an index into tuple outputs (`"attn[1]"`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.capture import capture, resolve_modules, split_name
from kdistill.errors import ConfigError


class _Block(nn.Module):
    """`attn` returns (output, weights) like a Hugging Face attention module."""

    def __init__(self, need_weights: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=self.need_weights,
                         average_attn_weights=False)[0]


def test_split_name() -> None:
    assert split_name("encoder.layer.0.attention.self[1]") == ("encoder.layer.0.attention.self", 1)
    assert split_name("blocks.0") == ("blocks.0", None)


def test_indexed_name_captures_that_element_of_a_tuple_output() -> None:
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(3, 5, 8)
    with capture(block, ["attn[1]", "attn"]) as feats:
        out = block(x)
    _, weights = block.attn(x, x, x, average_attn_weights=False)
    assert feats["attn[1]"].shape == (3, 2, 5, 5)  # (B, heads, Lq, Lk) probabilities
    torch.testing.assert_close(feats["attn[1]"], weights)
    torch.testing.assert_close(feats["attn"], out)  # no index: the first tensor
    assert set(resolve_modules(block, ["attn[1]"])) == {"attn[1]"}


def test_indexed_name_errors_name_the_field() -> None:
    x, block = torch.randn(2, 4, 8), _Block()
    with pytest.raises(ConfigError, match=r"method.pairs.*no element 5"), \
            capture(block, ["attn[5]"], where="method.pairs"):
        block(x)
    block = _Block(need_weights=False)  # returns (out, None)
    with pytest.raises(ConfigError, match="output_attentions"), \
            capture(block, ["attn[1]"], where="method.pairs"):
        block(x)
    with pytest.raises(ConfigError, match="no module named 'atn'"), capture(block, ["atn[1]"]):
        pass
