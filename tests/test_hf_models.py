"""Hugging Face causal LMs as kdistill models: a tiny Llama student, loading, layer subsets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.capture import capture
from kdistill.errors import ConfigError
from kdistill.models import build_model

pytest.importorskip("transformers")

TINY = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 64}


def _student(vocab: int = 50, **args: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("llama", input_shape=(12,), num_classes=vocab, args={**TINY, **args})


def test_llama_student_maps_ids_to_logits_and_trains() -> None:
    model = _student()
    ids = torch.randint(0, 50, (3, 12))
    logits = model(ids)
    assert logits.shape == (3, 12, 50) and logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # Tied embeddings: one table (50 x 32) serves input and output.
    inner = model.model
    assert inner.lm_head.weight is inner.get_input_embeddings().weight
    with capture(model, ["model.model.layers.1"]) as feats:
        model(ids)
    assert feats["model.model.layers.1"].shape == (3, 12, 32)
    with pytest.raises(TypeError, match="token ids"):
        model(torch.randn(3, 12))


def test_causal_mask_position_t_sees_no_later_token() -> None:
    model = _student().eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0, :7], model(changed)[0, :7])


def _saved_teacher(tmp_path: Path, vocab: int = 50, layers: int = 4) -> Path:
    torch.manual_seed(1)
    teacher = build_model("llama", input_shape=(12,), num_classes=vocab,
                          args={**TINY, "layers": layers})
    teacher.model.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_pretrained_loads_from_a_directory_and_checks_the_vocabulary(tmp_path: Path) -> None:
    path = _saved_teacher(tmp_path)
    teacher = build_model("hf_causal_lm", input_shape=(12,), num_classes=50,
                          args={"path": str(path)})
    assert teacher(torch.randint(0, 50, (2, 12))).shape == (2, 12, 50)
    # A padded embedding table (more rows than tokens) is accepted; fewer rows are not.
    padded = build_model("hf_causal_lm", input_shape=(12,), num_classes=48,
                         args={"path": str(path)})
    # The extra rows' logits are cut once, in the model: everything downstream sees V = 48.
    assert padded(torch.randint(0, 48, (2, 12))).shape == (2, 12, 48)
    with pytest.raises(ConfigError, match=r"vocabulary has 50 entries but .* has 60"):
        build_model("hf_causal_lm", input_shape=(12,), num_classes=60, args={"path": str(path)})
    with pytest.raises(ConfigError, match="never downloaded"):
        build_model("hf_causal_lm", input_shape=(12,), num_classes=50,
                    args={"path": "HuggingFaceTB/SmolLM2-135M"})


def test_student_initialised_from_a_subset_of_teacher_layers(tmp_path: Path) -> None:
    path = _saved_teacher(tmp_path)
    teacher = build_model("hf_causal_lm", input_shape=(12,), num_classes=50,
                          args={"path": str(path)})
    student = _student(init_from=str(path), layers=2, layer_map=[0, 3])
    t, s = teacher.model.state_dict(), student.model.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"],
                       t["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(s["model.layers.0.self_attn.q_proj.weight"],
                       t["model.layers.0.self_attn.q_proj.weight"])
    default = _student(init_from=str(path), layers=2)  # evenly spaced: first and last
    assert torch.equal(default.model.state_dict()["model.layers.1.mlp.up_proj.weight"],
                       t["model.layers.3.mlp.up_proj.weight"])
    with pytest.raises(ConfigError, match="layer_map"):
        _student(init_from=str(path), layers=2, layer_map=[0, 9])
