"""The memory plan (kdistill.planning): its instruments against hand counts, its parts, its
warnings and its errors. benchmarks/bench_plan.py checks it against measured runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill import devices
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.methods import build_method
from kdistill.methods.ce import CEConfig
from kdistill.planning import MemoryPlan, Phase, Stage, plan, plan_command
from kdistill.planning.memory import MB
from kdistill.planning.probe import HEAP_MAX, LiveBytes, Trace, saved_bytes
from kdistill.planning.steps import probe_forward, probe_step
from kdistill.types import DataSplits

F32 = 4


@pytest.fixture(scope="module")
def lm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-word tokenizer trained on stdlib docstrings (as in test_llm_pipeline)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdistill.data.text import read_corpus

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(read_corpus("stdlib_docs")[:800], trainers.WordLevelTrainer(
        vocab_size=600, special_tokens=["[UNK]", "</s>"], show_progress=False))
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(path)
    return path


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _splits(n: int = 16) -> DataSplits:
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    return DataSplits("toy", x, y, x[:4], y[:4], x[:4], y[:4], 3, (4,), "toy")


def test_saved_tensors_are_each_linears_input_and_the_relu_output() -> None:
    model, x = _stack(), torch.randn(5, 4)
    with saved_bytes(known=[*model.parameters()]) as saved:
        model(x).sum()
    # Linear 1 saves its input x (5 x 4); ReLU its output (5 x 8), which is also Linear 2's
    # input: one storage, counted once. Weights are parameters: not activations.
    assert sum(saved.values()) == (5 * 4 + 5 * 8) * F32


def test_activation_probe_is_the_hand_count_per_sample() -> None:
    # The training step's activations: the batch (saved by Linear 1), the ReLU output and the
    # logits, 4 + 8 + 3 floats per sample and nothing that does not grow with the batch.
    step = probe_step(_stack(), build_method(CEConfig()), lambda _b: None, _splits(), [],
                      "fp32")
    for batch in (1, 7, 100):
        assert step.activations.at(batch) == batch * (4 + 8 + 3) * F32
    assert step.teacher.at(100) == 0


def test_forward_peak_is_two_hidden_layers_alive_at_once() -> None:
    # No-grad: Linear 1's output and the ReLU's output coexist for one moment (the ReLU is
    # not in place), then the ReLU output and the logits: 2 x 8 floats per sample at most.
    fwd = probe_forward(_stack(), torch.randn(16, 4))
    assert fwd.peak.at(10) == 10 * 2 * 8 * F32
    assert fwd.output.at(10) == 10 * 3 * F32
    with torch.no_grad(), LiveBytes() as live:
        torch.ones(1000).mul(2)
    assert live.live == 0 and live.peak == 2 * 1000 * F32  # both freed at the block's end


def test_trace_extrapolates_each_allocation_and_splits_the_heap() -> None:
    # Two storages: one of 10 bytes per sample, one of 7 whatever the batch; the first is
    # freed before a third (5 per sample) is made.
    trace = Trace(2, (20, 7, -20, 10), 4, (40, 7, -40, 20))
    assert trace.at(100) == 1000 + 7  # the first and the constant one, before the free
    big = HEAP_MAX // 4  # per sample: at batch 8 the first storage is 2 x HEAP_MAX
    trace = Trace(2, (2 * big, 7, -2 * big), 4, (4 * big, 7, -4 * big))
    assert trace.replay(8) == (8 * big + 7, 7)  # mapped, not heap; the 7 bytes are heap
    assert trace.replay(2) == (2 * big + 7, 2 * big + 7)  # half of HEAP_MAX: heap
    # Probes that took different paths (other allocations) fall back to a line through
    # their peaks, with nothing counted as heap.
    assert Trace(2, (20,), 4, (30, 10)).replay(6) == (60, 0)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemoryPlan, object]:
    from tests.conftest import TINY_RECIPE

    path = tmp_path_factory.mktemp("plan") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    cfg = load_config(path, ["train.seeds=[0,1]", "student.model.args.hidden=[512]"])
    return plan(cfg), cfg


def _part(phase: Phase | Stage, name: str) -> int:
    return sum(p.bytes for p in phase.parts if p.name == name)


def _step_phase(result: MemoryPlan) -> Phase:
    baseline = next(s for s in result.stages if s.name == "baseline")
    return next(ph for ph in baseline.phases if ph.name.startswith("a training step"))


def test_parts_add_up_and_the_peak_is_the_largest_stage(tiny_plan: tuple) -> None:
    result, _ = tiny_plan
    names = [s.name for s in result.stages]
    assert names[:2] == ["prepare", "teach"] and names[-2:] == ["evaluate", "report"]
    assert {"cache", "baseline", "student"} <= set(names)  # the teacher's logits are cached
    for stage in result.stages:
        assert stage.total() == sum(p.bytes for p in stage.parts)
        assert stage.total() == max(ph.total(on_host=True) for ph in stage.phases)
    assert result.peak == max(s.total() for s in result.stages)
    assert f"in the {result.peak_stage.name} stage" in result.one_line()
    assert result.one_line().startswith("memory plan (cpu, fp32): peak ")
    table = result.table()
    assert table.count("**total**") == len(result.stages) and "| capacity |" in table
    # Two seeds: the last seed's student stage keeps the first seed's two students and its
    # own baseline, each with weights and gradients (the engine frees them at the next step).
    student = next(s for s in result.stages if s.name == "student")
    kept = next(p for p in student.parts if p.name.endswith("kept (weights and gradients)"))
    weights = _part(next(s for s in result.stages if s.name == "baseline"), "student weights")
    assert kept.name.startswith("3 trained") and kept.bytes == 3 * 2 * weights > 0


def test_adam_keeps_two_copies_and_sgd_with_momentum_one(tiny_plan: tuple) -> None:
    result, cfg = tiny_plan
    # A training step holds the weights, their gradients and Adam's two moments, each the
    # size of the trainable parameters (an MLP: all of them).
    step = _step_phase(result)
    weights = _part(step, "student weights")
    assert weights == (64 * 512 + 512 + 512 * 10 + 10) * F32
    assert _part(step, "student gradients") == weights
    assert _part(step, "optimiser state (adam)") == 2 * weights

    def with_optimizer(**fields: object) -> MemoryPlan:
        return plan(cfg.model_copy(update={"train": cfg.train.model_copy(update={
            "optimizer": cfg.train.optimizer.model_copy(update=fields)})}))

    assert _part(_step_phase(with_optimizer(name="sgd")), "optimiser state (sgd)") == weights
    assert _part(_step_phase(with_optimizer(name="sgd", momentum=0.0)),
                 "optimiser state (sgd)") == 0


def test_over_capacity_warns_and_names_the_batch_size(tiny_plan: tuple) -> None:
    result, _ = tiny_plan
    assert result.warnings() == []  # a few hundred MB fit this machine
    small = replace(result, capacity=1 * MB, capacity_note="a fake device")
    lines = small.warnings()
    assert lines[0].startswith("the plan needs ") and "a fake device" in lines[0]
    assert any("train.batch_size" in line and "train.grad_accum=2" in line for line in lines)
    assert "teacher.train.batch_size" in "\n".join(lines)  # the teacher trains too
    assert small.fits is False and small.one_line().endswith("see `kdistill plan`")


def test_bad_input_is_one_config_error(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe)
    with pytest.raises(ConfigError, match=r"^train.precision: expected one of fp32, bf16, fp16"):
        plan(cfg, precision="fp8")
    with pytest.raises(ConfigError, match=r"^train.device: expected auto, cpu, cuda"):
        plan(cfg, device="warp-drive")
    assert plan(cfg, device="auto").device == str(devices.resolve("auto"))  # the run's own
    with pytest.raises(ConfigError) as err:
        plan_command(str(tiny_recipe.with_name("missing.yaml")), [])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^student\.model"):
        plan_command(str(tiny_recipe), ["student.model.args.hidden=[-3]"])


def test_plan_command_prints_the_table_and_the_line(tiny_recipe: Path) -> None:
    lines: list[str] = []
    assert plan_command(str(tiny_recipe), ["train.batch_size=32"], echo=lines.append) == 0
    assert lines[0].startswith("| stage | at its peak | part | MB |")
    assert any(line.startswith("memory plan (cpu, fp32): peak ") for line in lines)


def test_validation_batch_is_read_from_the_task_without_running_the_model() -> None:
    from kdistill.planning.estimate import validation_batch
    from kdistill.tasks import TASKS
    from kdistill.tasks.base import Task

    calls: list[int] = []
    model = _stack()
    model.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    splits = _splits(n=16)
    # Classification validates at the engine's validation batch.
    assert validation_batch(TASKS["classification"], model, splits, batch_size=2) == 2

    class Whole(Task):  # a task that validates at a batch of its own: the whole split
        def validation_scores(self, model: nn.Module, splits: DataSplits, *,
                              batch_size: int) -> dict[str, float]:
            model(splits.val_x)
            return {}

    assert validation_batch(Whole(), model, splits, batch_size=2) == 4

    class ByBatch(Task):  # a task that validates at the engine's batch
        def validation_scores(self, model: nn.Module, splits: DataSplits, *,
                              batch_size: int) -> dict[str, float]:
            for i in range(0, len(splits.val_x), batch_size):
                model(splits.val_x[i:i + batch_size])
            return {}

    assert validation_batch(ByBatch(), model, splits, batch_size=3) == 3
    assert calls == []  # stopped before the model ran, every time


def test_bf16_activations_are_half_and_the_cast_weights_do_not_grow() -> None:
    # Under autocast the Linears save bf16 copies of their inputs and weights: per sample the
    # activations take 2 bytes a value instead of 4; the weight copies are the same at any
    # batch (the constant the two-batch probe separates).
    step = probe_step(_stack(), build_method(CEConfig()), lambda _b: None, _splits(), [],
                      "bf16")
    assert step.activations.at(101) - step.activations.at(1) == 100 * (4 + 8 + 3) * 2
    assert step.activations.at(1) > (4 + 8 + 3) * 2  # plus the cast weights


def _lm_plan(tmp_path: Path, tokenizer: Path, *overrides: str) -> MemoryPlan:
    from tests.test_llm_pipeline import _recipe

    recipe = _recipe(tmp_path, tokenizer, "{name: token_kd, kind: forward_kl}")
    return plan(load_config(recipe, ["train.batch_size=64", "train.grad_accum=1",
                                     *overrides]))


def _student_step(result: MemoryPlan) -> Phase:
    student = next(s for s in result.stages if s.name == "student")
    return next(ph for ph in student.phases if ph.name.startswith("a training step"))


def test_token_losses_buffers_follow_the_chunked_implementation(
        tmp_path: Path, lm_tokenizer: Path) -> None:
    # (64 blocks x 16 tokens x 600 words) logits: the naive token KD keeps several copies
    # (log-probabilities of both models, their gradients); the chunked form computes the
    # same loss 32 tokens at a time and keeps one (N, V) gradient buffer.
    naive = _lm_plan(tmp_path, lm_tokenizer)
    chunked = _lm_plan(tmp_path, lm_tokenizer, "method.chunk_size=32")
    logits = 64 * 16 * 600 * F32
    buffers = _part(_student_step(naive), "loss and backward buffers")
    assert buffers >= 2 * logits
    assert _part(_student_step(chunked), "loss and backward buffers") < buffers - logits
    over = replace(naive, capacity=1 * MB).warnings()
    assert any("method.chunk_size" in line for line in over)
    # A top-k cache feeds another loss, which chunk_size does not change: not suggested.
    topk = replace(_lm_plan(tmp_path, lm_tokenizer, "cache.topk=8"), capacity=1 * MB)
    assert not any("method.chunk_size" in line for line in topk.warnings())
