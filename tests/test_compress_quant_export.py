"""int8 quantization, QAT + KD through the engine, ONNX export checked in onnxruntime, and the
whole chain on the real sklearn digits (tiny models, seconds)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill.compress import chain_table, run_chain
from kdistill.compress.export import (
    ExportError,
    OnnxModel,
    check_onnx,
    compare_outputs,
    export_onnx,
    save_safetensors,
)
from kdistill.compress.finetune import LogitsTeacher, finetune_config, kd_finetune
from kdistill.compress.quantize import (
    convert_qat,
    prepare_qat,
    quantize_dynamic,
    quantize_static,
)
from kdistill.config import EvalConfig, TrainConfig
from kdistill.data import DataSplits, load_dataset
from kdistill.errors import ConfigError
from kdistill.evaluate import predict
from kdistill.methods.kd import KDConfig
from kdistill.models import MLP, SmallCNN

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", val_size=200, split_seed=0, where="data")


@pytest.fixture(scope="module")
def trained(digits: DataSplits) -> nn.Module:
    """An MLP trained for a few hundred steps: real logit ranges for int8 to round."""
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[64, 32])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        idx = torch.randint(len(digits.train_x), (64,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(digits.train_x[idx]), digits.train_y[idx]).backward()
        optimizer.step()
    return model.eval()


def _close(q: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |diff| / max |ref|, argmax agreement)."""
    rel = float((q - ref).abs().max() / ref.abs().max())
    return rel, float((q.argmax(1) == ref.argmax(1)).float().mean())


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_int8_models_run_and_stay_close_to_fp32(method: str, digits: DataSplits,
                                                trained: nn.Module) -> None:
    ref = predict(trained, digits.test_x)
    if method == "dynamic":
        q = quantize_dynamic(trained)
        assert "DynamicQuantizedLinear" in repr(q) or "quantized" in repr(q).lower()
    else:
        q = quantize_static(trained, digits.train_x[:500])
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized.modules.linear")
                   for m in q.modules())
    rel, agreement = _close(predict(q, digits.test_x), ref)
    assert 0 < rel < 0.05  # rounded (not the fp32 model), but close
    assert agreement >= 0.97
    # The int8 checkpoint really is smaller than the fp32 one.
    assert trained.layers[0].linear.weight.dtype == torch.float32  # the fp32 model untouched


def test_int8_safetensors_is_about_a_quarter(tmp_path: Path, digits: DataSplits,
                                             trained: nn.Module) -> None:
    q = quantize_static(trained, digits.train_x[:200])
    fp32 = save_safetensors(trained, tmp_path / "fp32.safetensors", quantized=False)
    int8 = save_safetensors(q, tmp_path / "int8.safetensors", quantized=True)
    ratio = int8.stat().st_size / fp32.stat().st_size
    assert 0.2 < ratio < 0.4
    tensors = load_file(str(int8))
    assert any(k.endswith(".int8") and v.dtype == torch.int8 for k, v in tensors.items())


def test_qat_with_kd_trains_through_the_engine(tmp_path: Path, digits: DataSplits,
                                               trained: nn.Module) -> None:
    prepared = prepare_qat(trained, digits.train_x[:200])
    assert any("FakeQuantize" in type(m).__name__ for m in prepared.modules())
    before = {k: v.clone() for k, v in prepared.state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    teacher = LogitsTeacher(predict(trained, digits.train_x))
    cfg = finetune_config(TrainConfig(batch_size=64, max_steps=4, log_every=1,
                                      optimizer={"name": "adam", "lr": 1e-3}), epochs=1, lr=None)
    acc = kd_finetune(prepared, teacher, digits, cfg, KDConfig(temperature=4.0),
                      stage_dir=tmp_path, echo=lambda _line: None)
    assert 0.5 < acc <= 1.0
    changed = [k for k, v in prepared.state_dict().items() if k in before
               and not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/kd" in r and "loss/ce" in r for r in records)
    q = convert_qat(prepared)
    _rel, agreement = _close(predict(q, digits.test_x), predict(trained, digits.test_x))
    assert agreement > 0.9


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_onnx_output_equals_pytorch(arch: str, tmp_path: Path, digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = (MLP(digits.input_shape, 10, hidden=[16]) if arch == "mlp"
             else SmallCNN(digits.input_shape, 10, channels=[4], hidden=8)).eval()
    path = export_onnx(model, digits.test_x[:2], tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    runner, check = check_onnx(path, model, digits.test_x[:50], rtol=1e-5)
    assert check["onnx_rel_diff"] < 1e-5 and check["onnx_agreement"] == 1.0
    # A dynamic batch axis: batch 1 and batch 7 both run.
    for n in (1, 7):
        torch.testing.assert_close(runner(digits.test_x[:n]), model(digits.test_x[:n]),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_int8_onnx_matches_the_int8_torch_model(method: str, tmp_path: Path,
                                                digits: DataSplits, trained: nn.Module) -> None:
    q = (quantize_dynamic(trained) if method == "dynamic"
         else quantize_static(trained, digits.train_x[:300]))
    path = export_onnx(q, digits.test_x[:2], tmp_path / "q.onnx", quantized=method,
                       float_model=trained)
    _runner, check = check_onnx(path, q, digits.test_x, rtol=0.05)
    # One self-contained file: no fp32 side graph or external weights left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"]
    assert check["onnx_agreement"] > 0.97
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QuantizeLinear"}


def test_a_diverging_export_is_refused(tmp_path: Path, digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[8]).eval()
    path = export_onnx(model, digits.test_x[:2], tmp_path / "m.onnx")
    other = MLP(digits.input_shape, 10, hidden=[8]).eval()  # other weights
    with pytest.raises(ExportError, match="differs from PyTorch"):
        compare_outputs(OnnxModel(path), other, digits.test_x[:20], rtol=1e-4)


def test_chain_end_to_end(tmp_path: Path, digits: DataSplits, trained: nn.Module) -> None:
    student = copy.deepcopy(trained)
    cfg = TrainConfig(epochs=1, batch_size=64, optimizer={"name": "adam", "lr": 0.01})
    stages = [{"kind": "prune", "method": "structured", "amount": 0.5, "rounds": 2},
              {"kind": "distill", "epochs": 1},
              {"kind": "quantize", "method": "static", "calibration_samples": 300},
              {"kind": "export", "formats": ["onnx", "safetensors"]}]
    models: dict[str, nn.Module] = {}
    rows = run_chain(stages, student=student, teacher=trained, splits=digits,
                     run_dir=tmp_path, train_cfg=cfg, echo=lambda _line: None,
                     eval_cfg=EvalConfig(latency_repeats=3, throughput_batch=8), models=models)
    assert [r["stage"] for r in rows] == ["0-prune", "1-distill", "2-quantize", "3-export"]
    assert rows[0]["params"] == (64 + 1) * 32 + (32 + 1) * 16 + (16 + 1) * 10
    assert student.layers[0].linear.out_features == 64  # the input is never changed
    assert rows[3]["runtime"] == "onnxruntime" and rows[2]["runtime"] == "torch"
    assert rows[2]["bytes"] < rows[1]["bytes"]  # int8
    for row in rows:
        assert row["accuracy"] > 0.8 and row["latency_ms"] > 0 and row["throughput"] > 0
    for i, kind in enumerate(["prune", "distill", "quantize", "export"]):
        info = json.loads((tmp_path / "compress" / f"{i}-{kind}" / "stage.json").read_text())
        assert info["stage"]["kind"] == kind
    assert (tmp_path / "compress" / "3-export" / "model.onnx").is_file()
    for r in (1, 2):  # each pruning round's fine-tuning logged on its own
        metrics = tmp_path / "compress" / "0-prune" / f"round-{r}" / "metrics.jsonl"
        assert any('"loss/kd"' in line for line in metrics.read_text().splitlines())
    assert set(models) == {"0-prune", "1-distill", "2-quantize", "3-export"}
    table = chain_table(rows)
    assert table.count("\n") == 2 + len(rows) and "onnxruntime" in table


def test_chain_refuses_bad_stages_before_training(tmp_path: Path, digits: DataSplits,
                                                  trained: nn.Module) -> None:
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ConfigError, match=r"compress\.1: 'distill' after"):
        run_chain([{"kind": "quantize"}, {"kind": "distill"}], student=trained, teacher=trained,
                  splits=digits, run_dir=tmp_path, train_cfg=cfg, echo=lambda _line: None)
    assert not (tmp_path / "compress").exists()
    with pytest.raises(ConfigError, match=r"compress\.rounds|compress.*rounds"):
        run_chain([{"kind": "prune", "rounds": 0}], student=trained, teacher=trained,
                  splits=digits, run_dir=tmp_path, train_cfg=cfg, echo=lambda _line: None)


def test_exported_files_name_the_classes(tmp_path: Path, digits: DataSplits) -> None:
    # A user's label map (labels.json) travels with the exported model.
    import json

    import onnx
    from safetensors import safe_open

    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[8]).eval()
    names = [f"class-{i}" for i in range(10)]
    path = save_safetensors(model, tmp_path / "m.safetensors", quantized=False, class_names=names)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == names
    path = export_onnx(model, digits.test_x[:2], tmp_path / "m.onnx", class_names=names)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_names"]) == names
