"""Pruning (kdistill.compress.prune) and the compression stage config: structured pruning really
removes units and equals the masked original when the removed units are dead; magnitude
pruning reaches the requested global sparsity; config errors name their field."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from kdistill.compress.prune import (
    apply_magnitude,
    find_groups,
    layer_widths,
    make_permanent,
    prune_structured,
    round_amounts,
    sparsity,
    structured_targets,
)
from kdistill.config.compress import check_order, parse_stages
from kdistill.errors import ConfigError
from kdistill.models import MLP, SmallCNN, count_parameters


def _kill_units(layer: nn.Module, units: list[int]) -> None:
    """Zero the weights and bias of `units`: after a ReLU they output exactly 0."""
    with torch.no_grad():
        layer.weight[units] = 0
        layer.bias[units] = 0


def test_structured_mlp_removes_dead_units_exactly() -> None:
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[16, 12]).eval()
    _kill_units(model.layers[0].linear, [1, 5, 6, 15])
    _kill_units(model.layers[1].linear, [0, 11])
    x = torch.randn(7, 1, 8, 8)
    before, params = model(x), count_parameters(model)
    widths = prune_structured(model, {"layers.0.linear": 12, "layers.1.linear": 10})
    assert widths == {"layers.0.linear": 12, "layers.1.linear": 10}
    assert model.layers[1].linear.in_features == 12 and model.head.in_features == 10
    assert params == (64 + 1) * 16 + (16 + 1) * 12 + (12 + 1) * 10
    assert count_parameters(model) == (64 + 1) * 12 + (12 + 1) * 10 + (10 + 1) * 10
    after = model(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_structured_keeps_the_largest_units_in_order() -> None:
    torch.manual_seed(0)
    model = MLP((4,), 3, hidden=[6]).eval()
    with torch.no_grad():  # unit k has norm ~k: the three largest are 3, 4, 5
        for k in range(6):
            model.layers[0].linear.weight[k] = k + 1.0
            model.layers[0].linear.bias[k] = 0.0
    kept_rows = model.layers[0].linear.weight[3:].clone()
    kept_cols = model.head.weight[:, 3:].clone()
    prune_structured(model, {"layers.0.linear": 3})
    torch.testing.assert_close(model.layers[0].linear.weight, kept_rows)
    torch.testing.assert_close(model.head.weight, kept_cols)


def test_structured_cnn_cuts_flattened_inputs_per_channel() -> None:
    """A conv feeding a Linear through flatten: each channel is a block of H*W inputs."""
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), 4, channels=[4, 6], hidden=8).eval()
    groups = {g.producer: g for g in find_groups(model)}
    assert groups["features.1.conv"].consumer == "fc.linear"
    assert groups["features.1.conv"].spatial == 4  # 8x8 -> pool -> pool = 2x2
    assert "head" not in groups  # the output layer is never cut
    _kill_units(model.features[1].conv, [0, 3, 4])
    _kill_units(model.features[0].conv, [2])
    x = torch.randn(5, 1, 8, 8)
    before = model(x)
    prune_structured(model, {"features.1.conv": 3, "features.0.conv": 3})
    assert model.fc.linear.in_features == 3 * 4
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def test_structured_batchnorm_is_sliced_with_its_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 6, 3, padding=1), bn=nn.BatchNorm2d(6), act=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(6, 3))).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
        model.bn.bias.uniform_(-0.5, 0.5)
        # Dead channels: zero conv and a BN that maps 0 to 0.
        _kill_units(model.conv, [1, 4])
        model.bn.running_mean[[1, 4]] = 0
        model.bn.bias[[1, 4]] = 0
    x = torch.randn(4, 1, 5, 5)
    before = model(x)
    prune_structured(model, {"conv": 4})
    assert model.bn.num_features == 4 and model.bn.running_mean.shape == (4,)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.b(torch.relu(self.a(x))))


def test_units_mixed_by_an_add_are_not_prunable() -> None:
    model = _Residual()
    assert [g.producer for g in find_groups(model)] == ["a"]  # b feeds an add
    with pytest.raises(ConfigError, match="b cannot be pruned structurally"):
        prune_structured(model, {"b": 4})


def test_structured_targets_and_rounds() -> None:
    assert structured_targets({"x": 256, "y": 3}, 0.5) == {"x": 128, "y": 2}
    assert structured_targets({"x": 2}, 0.99) == {"x": 1}
    assert round_amounts(0.5, 2) == [0.25, 0.5]
    model = MLP((4,), 3, hidden=[10, 10])
    prune_structured(model, structured_targets(layer_widths(model), 0.3))
    assert layer_widths(model) == {"layers.0.linear": 7, "layers.1.linear": 7}


def test_magnitude_reaches_the_global_sparsity_and_keeps_earlier_zeros() -> None:
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[32])
    total = sum(m.weight.numel() for m in (model.layers[0].linear, model.head))
    apply_magnitude(model, 0.3)
    first = [m.weight.detach().clone() == 0 for m in (model.layers[0].linear, model.head)]
    apply_magnitude(model, 0.6)
    make_permanent(model)
    assert not any("weight_orig" in name for name, _ in model.named_parameters())
    assert sparsity(model) == pytest.approx(round(0.6 * total) / total)
    for zero, layer in zip(first, (model.layers[0].linear, model.head), strict=True):
        assert (layer.weight[zero] == 0).all()  # round 1's zeros stay pruned
    # Global, not per layer: the layers end up with different sparsities.
    per_layer = [float((m.weight == 0).float().mean()) for m in (model.layers[0].linear,
                                                                   model.head)]
    assert per_layer[0] != pytest.approx(per_layer[1])


def test_magnitude_masks_survive_fine_tuning_until_made_permanent() -> None:
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=[8])
    apply_magnitude(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    make_permanent(model)
    assert sparsity(model) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(("stage", "where", "text"), [
    ({"kind": "prune", "amount": 1.5}, "compress.0.amount", "less than 1"),
    ({"kind": "prune", "amount": 0.5, "method": "random"}, "compress.0.method", "magnitude"),
    ({"kind": "prune", "amont": 0.5}, "compress.0.amont", "unknown key"),
    ({"kind": "shrink"}, "compress.0", "unknown stage kind"),
    ({"amount": 0.5}, "compress.0", "needs a kind"),
    ({"kind": "quantize", "method": "int4"}, "compress.0.method", "dynamic"),
    ({"kind": "export", "formats": ["tflite"]}, "compress.0.formats.0", "onnx"),
    ({"kind": "export", "formats": []}, "compress.0.formats", "at least 1"),
    # A field the stage would not read is refused, not ignored.
    ({"kind": "quantize", "temperature": 2.0}, "compress.0", "temperature: not used"),
    ({"kind": "quantize", "teacher": "teacher"}, "compress.0", "teacher: not used"),
    ({"kind": "quantize", "method": "dynamic", "calibration_samples": 9}, "compress.0",
     "calibration_samples: not used"),
    ({"kind": "quantize", "method": "static", "epochs": 3, "lr": 0.1}, "compress.0",
     "epochs, lr: not used"),
    ({"kind": "prune", "finetune_epochs": 0, "alpha": 0.5}, "compress.0",
     "finetune_epochs: 0 trains nothing"),
])
def test_stage_config_errors_name_the_field(stage: dict, where: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_stages([stage])
    assert info.value.where == where
    assert text in info.value.message


def test_stage_order_is_checked() -> None:
    ok = parse_stages([{"kind": "prune"}, {"kind": "distill"}, {"kind": "quantize"},
                       {"kind": "export"}])
    check_order(ok)
    assert ok[0].method == "structured" and ok[2].method == "dynamic"
    # The same fields are accepted where the stage reads them.
    parse_stages([{"kind": "quantize", "method": "qat", "epochs": 2, "temperature": 2.0},
                  {"kind": "prune", "finetune_epochs": 1, "alpha": 0.5}])
    with pytest.raises(ConfigError, match=r"compress\.1: 'prune' after compress\.0"):
        check_order(parse_stages([{"kind": "quantize"}, {"kind": "prune"}]))
    with pytest.raises(ConfigError, match="quantize once"):
        check_order(parse_stages([{"kind": "quantize"}, {"kind": "quantize"}]))


def test_a_shipped_chain_survives_overrides() -> None:
    # Overrides re-validate the whole dumped recipe (defaults included): the unused-field
    # check must judge values, not which keys were written.
    from pathlib import Path

    from kdistill.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "compress-mnist.yaml"
    cfg = load_config(recipe, ["train.epochs=1"])
    assert [stage.kind for stage in cfg.compress][-2:] == ["quantize", "export"]
    with pytest.raises(ConfigError, match=r"compress\.\d+: temperature: not used"):
        load_config(recipe, ["train.epochs=1", "compress=[{kind: quantize, temperature: 2}]"])
