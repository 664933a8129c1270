"""The method contract, over every entry of METHODS (DESIGN.md), and kd's loss by hand."""

from __future__ import annotations

import ast
import math
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml
from torch import nn

import kdistill.methods
from kdistill.build import build_optimizer
from kdistill.capture import capture
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.logger import MetricsLogger
from kdistill.methods import METHODS, Outputs, build_method
from kdistill.methods.base import Nets
from kdistill.methods.kd import KDConfig
from kdistill.schedules import Progress
from kdistill.teachers import OnlineTeacher


def _net(seed: int, widths: tuple[int, int] = (4, 8)) -> nn.Module:
    """A tiny CNN for (1, 8, 8) inputs; module names "0".."5" (convs at "0" and "2")."""
    torch.manual_seed(seed)
    a, b = widths
    return nn.Sequential(nn.Conv2d(1, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, b, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(b * 64, 10))


def _transformer(seed: int, dim: int, heads: int) -> nn.Module:
    """A TinyTransformer for (1, 8, 8) inputs: 4 patches + [CLS], probs at blocks.<i>.attn.probs."""
    from kdistill.models.transformer import TinyTransformer

    torch.manual_seed(seed)
    return TinyTransformer((1, 8, 8), 10, dim=dim, heads=heads, depth=2)


def _llama(seed: int, hidden: int) -> nn.Module:
    """A tiny Llama causal LM over a 20-token vocabulary (ids (B, 9) -> logits (B, 9, 20))."""
    from kdistill.models import build_model

    torch.manual_seed(seed)
    return build_model("llama", input_shape=(9,), num_classes=20,
                       args={"hidden": hidden, "layers": 1, "heads": 2})


def _berts() -> tuple[nn.Module, nn.Module]:
    """A 1-layer text student and a 2-layer text teacher (tiny random BERTs, width 32) over a
    100-token vocabulary with pad id 0; token states at tokens.<k>."""
    from kdistill.models import build_model
    from tests.test_text_classification import _tiny_bert

    path = _tiny_bert(Path(tempfile.mkdtemp()) / "bert", layers=2, vocab=100)
    teacher = build_model("hf_encoder_classifier", input_shape=(12,), num_classes=10,
                          args={"path": path})
    torch.manual_seed(0)
    student = build_model("hf_encoder_student", input_shape=(12,), num_classes=10,
                          args={"init_from": path, "layers": 1, "random_init": True})
    return student, teacher
def _seq2seq(seed: int, dim: int, layers: int) -> nn.Module:
    """A tiny encoder-decoder over a 20-token vocabulary: packed (B, 2, 9) -> (B, 9, 20)."""
    from kdistill.models.seq2seq import seq2seq_transformer

    torch.manual_seed(seed)
    return seq2seq_transformer((2, 9), 20, d_model=dim, heads=2, enc_layers=layers,
                               dec_layers=layers, ff=2 * dim)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# The fixed menu of `Example.nets` (kdistill.methods.base): name -> (student, teacher).
NETS: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
    "cnn": lambda: (_net(0, (3, 6)), _net(1)),
    "transformer": lambda: (_transformer(0, 8, 2), _transformer(1, 16, 4)),
    "llama": lambda: (_llama(0, 8), _llama(1, 16)),
    "bert": _berts,
    "seq2seq": lambda: (_seq2seq(0, 8, 1), _seq2seq(1, 16, 2)),
    # A wider teacher output: a method's projection (an adapter) must get gradients.
    "embedding": lambda: (_net(0, (3, 6)),
                          nn.Sequential(*list(_net(1))[:-1], nn.Linear(8 * 64, 12))),
}


def _data(nets: str) -> tuple[torch.Tensor, torch.Tensor]:
    """32 training items for the menu entry: images and classes, or token rows."""
    if nets == "llama":  # token blocks, labels = the ids
        ids = torch.randint(0, 20, (32, 9))
        return ids, ids.clone()
    if nets == "bert":  # token ids, the last positions of some rows padded (id 0)
        ids = torch.randint(1, 100, (32, 12))
        ids[::2, 8:] = 0
        return ids, torch.randint(0, 10, (32,))
    if nets == "seq2seq":  # packed rows, see kdistill.data.translation
        from kdistill.data.translation import pack

        src = [torch.randint(4, 20, (int(n),)).tolist() for n in torch.randint(1, 7, (32,))]
        tgt = [torch.randint(4, 20, (int(n),)).tolist() for n in torch.randint(1, 7, (32,))]
        return pack(src, tgt, 9)
    return torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))


def test_the_menu_covers_every_example() -> None:
    assert set(get_args(Nets)) == set(NETS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name: str) -> None:
    """One epoch of the method's own example (`Method.example`) through the engine."""
    _contract(name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_under_bf16_autocast(name: str) -> None:
    """Features arrive in bf16 under autocast; a method's own modules (fp32) must take them."""
    _contract(name, precision="bf16", max_steps=1)


def test_the_worked_example_in_docs_methods_passes_the_contract(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    section = text[text.index("## Adding a method"):]
    code = section[section.index("```python\n") + 10:section.index("```\n")]
    module = types.ModuleType("kdistill.methods.logit_mse")  # as if it were the file
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "docs/methods.md", "exec"), module.__dict__)  # our own docs, tested
    monkeypatch.setitem(METHODS, "logit_mse", module.LogitMSE)
    _contract("logit_mse")


def _contract(name: str, precision: str = "fp32", max_steps: int | None = None) -> None:
    example = METHODS[name].example
    method = build_method(METHODS[name].config_type(**example.config))
    student, teacher_net = NETS[example.nets]()
    before = [p.detach().clone() for p in student.parameters()]
    x, y = _data(example.nets)
    # Hooks a library installs itself on a first forward (transformers' output recorders)
    # are not kdistill's: count after one forward, then require exactly those at the end.
    with torch.no_grad():
        student(x[:2]), teacher_net(x[:2])
    own_hooks = _hooks(student), _hooks(teacher_net)
    method.setup(student, teacher_net if method.uses_teacher else None, x[:2],
                 num_samples=len(x))
    loader = BatchLoader(x, y, batch_size=16, seed=0)
    opt = build_optimizer([*student.parameters(), *method.optimizer_parameters()],
                          TrainConfig().optimizer)
    aux = method.auxiliary()
    aux_before = [p.detach().clone() for p in aux.parameters] if aux else []
    logger = MetricsLogger()
    teacher = OnlineTeacher(teacher_net) if method.uses_teacher else None
    cfg = TrainConfig(epochs=1, log_every=1, precision=precision, max_steps=max_steps)
    train(student, teacher, method, loader, opt, cfg, logger=logger)
    assert all(math.isfinite(r["loss"]) for r in logger.records)
    assert all(r["loss"] > 0 for r in logger.records)
    assert all(p.grad is None for p in teacher_net.parameters())
    # Every adapter trained; an auxiliary network (a data-free generator) was stepped by the
    # engine with its own optimizer.
    assert all(p.grad is not None for p in method.optimizer_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    if aux is not None:
        assert any(not torch.equal(a, b) for a, b in zip(aux_before, aux.parameters,
                                                          strict=True))
    assert (_hooks(student), _hooks(teacher_net)) == own_hooks
    assert METHODS[name].paper


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"ce"}))
def test_every_method_has_a_recipe(name: str) -> None:
    """Adding a method is its file, one line in METHODS and one recipe naming it."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    named = [p.name for p in sorted(recipes.glob("*.yaml"))
             if _method_name(yaml.safe_load(p.read_text())) == name]
    assert named, f"no recipe in recipes/ uses method '{name}'"


def _method_name(recipe: dict) -> str:
    method = recipe.get("method") or {}
    return method.get("name", "kd") if isinstance(method, dict) else str(method)


def test_methods_import_only_what_the_contract_allows() -> None:
    """Methods see the run through `Collectives` and `DataTools`, never its modules."""
    allowed = ("kdistill.losses", "kdistill.capture", "kdistill.adapters",
               "kdistill.schedules", "kdistill.types", "kdistill.errors", "kdistill.methods",
               "kdistill.models.generator")
    folder = Path(kdistill.methods.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in names:
                if module.startswith("kdistill") and module != "kdistill":
                    assert module.startswith(allowed), f"{path.name} imports {module}"
                assert module != "kdistill", f"{path.name} imports the kdistill package"


def test_kd_terms_by_hand() -> None:
    # student [0, 0], teacher [ln 3, 0], T = 2, alpha = 0.75, label 0:
    # p_T = softmax([ln3/2, 0]) = [√3, 1]/(√3+1); q_T = [0.5, 0.5]
    # KL = Σ p log(p/q); kd term = alpha · T² · KL; ce term = (1 − alpha) · ln 2
    method = build_method(KDConfig(temperature=2.0, alpha=0.75))
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    terms = method.loss_terms(Outputs(s, t), {"label": torch.tensor([0])},
                              Progress(0, 0, 10, 10))
    assert float(terms["kd"]) == pytest.approx(0.75 * 4 * kl, rel=1e-6)
    assert float(terms["ce"]) == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_kd_schedules_follow_progress() -> None:
    method = build_method(KDConfig(temperature={"kind": "linear", "start": 8, "end": 2},
                                   alpha={"kind": "step", "values": [0.7, 0.3],
                                          "milestones": [0.5]}))
    assert method.scalars(Progress(0, 0, 11, 11)) == {"temperature": 8.0, "alpha": 0.7}
    assert method.scalars(Progress(10, 0, 11, 11)) == {"temperature": 2.0, "alpha": 0.3}


def test_soft_ce_variant_has_the_same_student_gradient() -> None:
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    grads = []
    for soft_loss in ("kl", "soft_ce"):
        method = build_method(KDConfig(temperature=3.0, alpha=1.0, soft_loss=soft_loss))
        terms = method.loss_terms(Outputs(s, t), {"label": torch.zeros(4, dtype=torch.long)},
                                  Progress(0, 0, 1, 1))
        grads.append(torch.autograd.grad(terms["kd"], s)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_capture_by_name_removes_hooks_and_suggests_names() -> None:
    from kdistill.errors import ConfigError

    net = _net(0)
    with capture(net, ["2"]) as feats:
        net(torch.randn(3, 1, 8, 8))
        assert feats["2"].shape == (3, 8, 8, 8)
    assert _hooks(net) == 0
    lstm = nn.LSTM(4, 5, batch_first=True)
    with capture(lstm, [""]) as feats:  # "" is the root; tuple outputs give the first tensor
        lstm(torch.randn(2, 3, 4))
        assert feats[""].shape == (2, 3, 5)
    with pytest.raises(ConfigError, match="no module named 'fc1'"), capture(net, ["fc1"]):
        pass
    assert _hooks(net) == 0


def test_fitnet_across_architectures_cnn_teacher_mlp_student() -> None:
    # A (8, 8, 8) teacher map is pooled to its 8 channels; the MLP's 16 units map onto them.
    from kdistill.methods.fitnet import FitNetConfig

    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    teacher = _net(1)
    method = build_method(FitNetConfig(student_layer="2", teacher_layer="2"))
    x = torch.randn(5, 1, 8, 8)
    method.setup(student, teacher, x)
    assert isinstance(method.adapter, nn.Linear) and method.adapter.weight.shape == (8, 16)
    with capture(student, ["2"]) as sf, capture(teacher, ["2"]) as tf:
        out = Outputs(student(x), teacher(x).detach(), dict(sf), {"2": tf["2"].detach()})
    terms = method.loss_terms(out, {"label": torch.zeros(5, dtype=torch.long)},
                              Progress(0, 0, 10, 10))
    expected = nn.functional.mse_loss(method.adapter(sf["2"]), tf["2"].mean(dim=(2, 3)))
    torch.testing.assert_close(terms["hint"], expected)
    assert set(terms) == {"hint", "kd", "ce"}


def test_fitnet_two_stages() -> None:
    from kdistill.methods.fitnet import FitNetConfig

    method = build_method(FitNetConfig(student_layer="2", teacher_layer="2", hint_epochs=2))
    x = torch.randn(4, 1, 8, 8)
    student, teacher = _net(0, (3, 6)), _net(1)
    method.setup(student, teacher, x)
    with capture(student, ["2"]) as sf, capture(teacher, ["2"]) as tf:
        out = Outputs(student(x), teacher(x), dict(sf), dict(tf))
    batch = {"label": torch.zeros(4, dtype=torch.long)}
    assert set(method.loss_terms(out, batch, Progress(0, 1, 40, 10))) == {"hint"}
    assert set(method.loss_terms(out, batch, Progress(20, 2, 40, 10))) == {"kd", "ce"}


@pytest.mark.parametrize("name", ["at", "sp", "rkd", "pkt", "dkd", "dist"])
def test_method_terms_are_the_weighted_losses(name: str) -> None:
    from kdistill import losses
    from kdistill.losses import features as fl

    torch.manual_seed(0)
    s_feat, t_feat = torch.randn(6, 3, 4, 4), torch.randn(6, 5, 4, 4)
    s_log, t_log = torch.randn(6, 10), torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    ce = losses.hard_cross_entropy(s_log, labels)
    examples = {
        "at": ({"pairs": [["a", "b"]], "beta": 10.0},
               {"at": 5.0 * fl.attention_transfer(s_feat, t_feat) / 16, "ce": ce}),
        "sp": ({"pairs": [["a", "b"]], "gamma": 7.0},
               {"sp": 7.0 * fl.similarity_preserving(s_feat, t_feat), "ce": ce}),
        "rkd": ({"student_layer": "a", "teacher_layer": "b"},
                {"rkd_distance": 25 * fl.rkd_distance(s_feat.flatten(1), t_feat.flatten(1)),
                 "rkd_angle": 50 * fl.rkd_angle(s_feat.flatten(1), t_feat.flatten(1)),
                 "ce": ce}),
        "pkt": ({"student_layer": "a", "teacher_layer": "b", "weight": 3.0},
                {"pkt": 3.0 * fl.pkt(s_feat.flatten(1), t_feat.flatten(1)), "ce": ce}),
        "dkd": ({"weight": 0.5}, {"dkd": 0.5 * losses.dkd(s_log, t_log, labels), "ce": ce}),
        "dist": ({"temperature": 2.0},
                 {"dist": losses.dist_loss(s_log, t_log, temperature=2.0), "ce": ce}),
    }
    cfg, expected = examples[name]
    method = build_method(METHODS[name].config_type(**cfg))
    out = Outputs(s_log, t_log, {"a": s_feat}, {"b": t_feat})
    terms = method.loss_terms(out, {"label": labels}, Progress(0, 0, 10, 10))
    assert set(terms) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value)


def test_multi_kd_mixture_by_hand_and_single_teacher_equals_kd() -> None:
    from kdistill.methods.multi_kd import MultiKDConfig

    t1 = torch.tensor([[math.log(3.0), 0.0]])  # softmax at T=1: [0.75, 0.25]
    t2 = torch.tensor([[0.0, 2 * math.log(3.0)]])  # at T=2: softmax([0, ln 3]) = [0.25, 0.75]
    stacked = torch.stack([t1, t2])
    labels = torch.tensor([0])
    method = build_method(MultiKDConfig(weights=[3.0, 1.0], temperatures=[1.0, 2.0]))
    # p̄ = (3·[0.75, 0.25] + 1·[0.25, 0.75]) / 4 = [0.625, 0.375]
    torch.testing.assert_close(method.mixture(stacked, labels, 4.0), torch.tensor([[0.625, 0.375]]))
    confident = build_method(MultiKDConfig(weights=[3.0, 1.0], temperatures=[1.0, 2.0],
                                           confidence=True))
    # per-sample weights ∝ w_k · p_k(label 0): 3·0.75 = 2.25 and 1·0.25 = 0.25 -> 0.9, 0.1
    expected = 0.9 * torch.tensor([0.75, 0.25]) + 0.1 * torch.tensor([0.25, 0.75])
    torch.testing.assert_close(confident.mixture(stacked, labels, 4.0), expected[None])

    s, t = torch.randn(5, 10), torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    progress = Progress(0, 0, 10, 10)
    multi = build_method(MultiKDConfig(temperature=3.0, alpha=0.8)).loss_terms(
        Outputs(s, t[None]), {"label": y}, progress)
    single = build_method(KDConfig(temperature=3.0, alpha=0.8)).loss_terms(
        Outputs(s, t), {"label": y}, progress)
    torch.testing.assert_close(multi["kd"], single["kd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(multi["ce"], single["ce"])
