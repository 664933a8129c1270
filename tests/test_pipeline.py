"""The whole run on a tiny real recipe (sklearn digits): stages, cache use, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill import load_config, run
from kdistill.errors import ConfigError
from kdistill.logger import read_metrics


def test_run_stages_cache_and_report(tiny_recipe: Path) -> None:
    lines: list[str] = []
    cfg = load_config(tiny_recipe)
    result = run(cfg, echo=lines.append)
    run_dir = result.run_dir
    for path in ("config.yaml", "report.md", "report.html", "eval.json",
                 "teacher/model.safetensors",
                 "cache/teacher/manifest.json", "seed-0/baseline/model.safetensors",
                 "seed-0/student/model.safetensors", "seed-0/student/metrics.jsonl"):
        assert (run_dir / path).is_file(), path
    assert result.teacher_forwards == 0  # distillation read the cache only
    assert not (run_dir / "seed-0/student/checkpoints").exists()  # superseded by the model
    rows = result.rows
    assert set(rows) == {"teacher", "baseline", "student"}
    assert rows["teacher"][0]["accuracy"] > 0.85  # a real teacher on real digits
    for key in ("accuracy", "errors", "agreement", "ece", "params", "bytes", "latency_ms",
                "throughput"):
        assert key in rows["student"][0]
    report = (run_dir / "report.md").read_text()
    assert "distilled student" in report and "student alone (baseline)" in report
    assert "temperature: 4.0" in report  # the resolved recipe is in the report
    val = [r for r in read_metrics(run_dir / "seed-0/student/metrics.jsonl")
           if r["split"] == "val"]
    assert len(val) == cfg.train.epochs

    # A second run finds every stage done: nothing is retrained, the cache is reused.
    again: list[str] = []
    second = run(cfg, echo=again.append)
    assert any("valid teacher cache found" in line for line in again)
    assert sum("done earlier" in line for line in again) == 3
    assert second.rows["student"][0]["accuracy"] == rows["student"][0]["accuracy"]

    # Changing the method redoes the distilled student only.
    changed = load_config(tiny_recipe, ["method.temperature=2"])
    third: list[str] = []
    run(changed, echo=third.append)
    assert any("student: recipe changed" in line for line in third)
    assert any("baseline (seed 0): done earlier" in line for line in third)


def test_tensorboard_event_files_per_stage_when_asked(tiny_recipe: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", "teacher.train.epochs=1",
                                    "logging.tensorboard=true"])
    run(cfg, echo=lambda _: None)
    for stage in ("teacher", "seed-0/student"):
        events = EventAccumulator(str(cfg.run_dir / stage / "tensorboard"))
        events.Reload()
        assert "train/loss" in events.Tags()["scalars"], stage
        assert "val/accuracy" in events.Tags()["scalars"], stage
    off = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", "name=no-tb"])
    run(off, echo=lambda _: None)
    assert not (off.run_dir / "seed-0/student/tensorboard").exists()


def test_stale_cache_is_rebuilt_when_the_teacher_changes(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false"])
    run(cfg, echo=lambda _: None)
    manifest = json.loads((cfg.run_dir / "cache/teacher/manifest.json").read_text())
    retrained = load_config(tiny_recipe, ["train.epochs=1", "baseline=false",
                                          "teacher.train.epochs=1"])
    lines: list[str] = []
    run(retrained, echo=lines.append)
    assert any("stale teacher cache" in line for line in lines)
    rebuilt = json.loads((cfg.run_dir / "cache/teacher/manifest.json").read_text())
    assert rebuilt["key"]["teacher"] != manifest["key"]["teacher"]


def test_augmented_inputs_run_the_teacher_online(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", "train.augment=jitter",
                                    "train.jitter_pixels=1"])
    result = run(cfg, echo=lambda _: None)
    assert result.teacher_forwards == 20  # ceil((1438 - 200 val) / 64) batches, one epoch
    two = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", "train.augment=jitter",
                                    "train.jitter_pixels=1", "train.seeds=[0,1]", "name=two"])
    assert run(two, echo=lambda _: None).teacher_forwards == 40  # 20 per seed, not cumulative
    assert not (cfg.run_dir / "cache").exists()


def test_seeds_give_mean_and_std(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, ["train.epochs=1", "train.seeds=[0,1]"])
    result = run(cfg, echo=lambda _: None)
    assert [r["seed"] for r in result.rows["student"]] == [0, 1]
    assert " ± " in (cfg.run_dir / "report.md").read_text()


@pytest.mark.parametrize("override", ["teacher.model.arch=lenet5"])
def test_other_teacher_archs_run(tiny_recipe: Path, override: str) -> None:
    cfg = load_config(tiny_recipe, [override, "teacher.model.args={}", "teacher.train.epochs=1",
                                    "train.epochs=1", "baseline=false"])
    assert run(cfg, echo=lambda _: None).rows["teacher"][0]["accuracy"] > 0.1


def test_adding_a_seed_does_not_redo_the_first_one(tiny_recipe: Path) -> None:
    run(load_config(tiny_recipe, ["train.epochs=1", "train.log_every=5"]), echo=lambda _: None)
    lines: list[str] = []
    run(load_config(tiny_recipe, ["train.epochs=1", "train.seeds=[0,1]"]), echo=lines.append)
    assert any("student (seed 0): done earlier" in line for line in lines)
    assert any("student (seed 1): training" in line for line in lines)


def test_a_changed_teacher_weights_file_redoes_teacher_cache_and_student(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_model

    from kdistill.build import build_data, build_network

    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false"])
    splits = build_data(cfg.data)
    weights = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(build_network(cfg.teacher.model, splits, where="t"), str(weights))
    given = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", "teacher.train=null",
                                      f"teacher.model.weights={weights}"])
    run(given, echo=lambda _: None)
    torch.manual_seed(1)  # same recipe text, other weights in the file
    save_model(build_network(cfg.teacher.model, splits, where="t"), str(weights))
    lines: list[str] = []
    run(given, echo=lines.append)
    assert any("teacher: recipe changed" in line for line in lines)
    assert any("stale teacher cache" in line for line in lines)
    assert any("student: recipe changed" in line for line in lines)


def test_feature_method_caches_teacher_layers_and_trains_as_online(tiny_recipe: Path) -> None:
    fitnet = "method={name: fitnet, student_layer: layers.0, teacher_layer: layers.0}"
    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", fitnet])
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    assert any("(logits and layers.0)" in line for line in lines)
    assert result.teacher_forwards == 0  # hint targets came from the cache
    manifest = json.loads((cfg.run_dir / "cache/teacher/manifest.json").read_text())
    assert manifest["key"]["layers"] == ["layers.0"]
    assert manifest["fields"]["layers.0"]["shape"] == [1238, 64]  # digits train split, width 64
    metrics = read_metrics(cfg.run_dir / "seed-0/student/metrics.jsonl")
    assert "loss/hint" in metrics[0]
    cached_w = load_file(cfg.run_dir / "seed-0/student/model.safetensors")
    # The same run with the live teacher: the same student, up to float rounding (the cache
    # was computed in batches of 1000, training batches are 64).
    online_cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", fitnet,
                                           "cache.enabled=false", "name=tiny-online"])
    online = run(online_cfg, echo=lines.append)
    assert online.teacher_forwards == 20  # one epoch of batches through the live teacher
    online_w = load_file(online_cfg.run_dir / "seed-0/student/model.safetensors")
    for name, value in cached_w.items():
        torch.testing.assert_close(value, online_w[name], atol=1e-4, rtol=1e-4)


def test_feature_cache_over_its_size_limit_runs_the_teacher_online(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, [
        "train.epochs=1", "baseline=false", "cache.max_mb=0.1",
        "method={name: fitnet, student_layer: layers.0, teacher_layer: layers.0}"])
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    assert any("over cache.max_mb=0.1" in line for line in lines)
    assert result.teacher_forwards == 20
    assert not (cfg.run_dir / "cache").exists()


def test_self_distillation_needs_no_teacher_outputs(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false",
                                    "method={name: self_distill, layers: [layers.0]}"])
    result = run(cfg, echo=lambda _: None)
    assert result.teacher_forwards == 0
    assert not (cfg.run_dir / "cache").exists()
    metrics = read_metrics(cfg.run_dir / "seed-0/student/metrics.jsonl")
    assert {"loss/ce", "loss/exit_ce", "loss/exit_kd"} <= set(metrics[0])


def test_born_again_generations_teach_each_other(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, ["train.epochs=1", "generations=3"])
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    assert list(result.rows) == ["teacher", "baseline", "student", "student-gen2",
                                 "student-gen3"]
    assert result.teacher_forwards == 0  # every generation read a cache
    for gen in ("student", "student-gen2"):  # each trained student is cached as the next teacher
        assert (cfg.run_dir / "seed-0" / gen / "cache" / "manifest.json").is_file()
    report = (cfg.run_dir / "report.md").read_text()
    assert "distilled student, generation 3" in report
    assert "The distilled student, generation 3 makes" in report
    # Generation 2 depends on generation 1's weights, not only on the recipe: change the
    # saved generation-1 model and generation 2 (then 3) is redone.
    from safetensors.torch import load_file, save_file

    path = cfg.run_dir / "seed-0" / "student" / "model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(path).items()}, str(path))
    lines = []
    run(cfg, echo=lines.append)
    assert any("student (seed 0): done earlier" in line for line in lines)
    assert any("student-gen2: recipe changed" in line for line in lines)
    assert any("student-gen3: recipe changed" in line for line in lines)


def test_multi_teacher_run_caches_and_evaluates_every_teacher(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, [
        "train.epochs=1", "baseline=false", "method={name: multi_kd, weights: [2, 1]}",
        "more_teachers=[{model: {arch: lenet5, args: {}}, train: {epochs: 1}}]"])
    result = run(cfg, echo=lambda _: None)
    assert list(result.rows) == ["teacher", "teacher-2", "student"]
    assert result.teacher_forwards == 0  # both teachers read from their caches
    assert (cfg.run_dir / "cache" / "teacher-2" / "manifest.json").is_file()
    assert "| teacher 2 |" in (cfg.run_dir / "report.md").read_text()


def test_more_teachers_need_a_multi_teacher_method(tiny_recipe: Path) -> None:
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="more_teachers: method 'kd' learns from one teacher"):
        load_config(tiny_recipe, ["more_teachers=[{model: {arch: lenet5}, train: {}}]"])


def test_a_torn_stage_marker_redoes_the_stage(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false"])
    run(cfg, echo=lambda _: None)
    (cfg.run_dir / "seed-0" / "student" / "stage.json").write_text('{"fingerp')
    lines: list[str] = []
    run(cfg, echo=lines.append)
    assert any("student: recipe changed" in line for line in lines)


def test_compress_stages_run_after_distillation_into_the_report(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, [
        "train.epochs=1", "baseline=false", "teacher.train.epochs=1",
        "compress=[{kind: prune, method: structured, amount: 0.5, finetune_epochs: 1},"
        " {kind: quantize, method: dynamic}, {kind: export, formats: [onnx]}]"])
    run(cfg, echo=lambda _: None)
    chain = json.loads((cfg.run_dir / "compress" / "eval.json").read_text())
    assert [r["stage"].split("-", 1)[-1] for r in chain][:2] == ["prune", "quantize"]
    assert chain[0]["params"] < 1210  # the pruned MLP is really smaller than the 16-wide one
    report = (cfg.run_dir / "report.md").read_text()
    assert "## Compression chain" in report and "distilled student" in report
    assert "Compression chain (test set)" in (cfg.run_dir / "report.html").read_text()
    with pytest.raises(ConfigError, match="compress"):
        # Text (causal LM) data: refused before the teacher stage, not after training.
        run(load_config(tiny_recipe, [
            "data={name: stdlib_docs, tokenizer: smollm2, val_size: 0.05, test_size: 0.05}",
            "method.name=token_kd", "compress=[{kind: quantize, method: dynamic}]"]),
            echo=lambda _: None)


def test_a_data_free_run_saves_its_generated_samples_into_the_report(tiny_recipe: Path) -> None:
    cfg = load_config(tiny_recipe, ["train.epochs=1", "baseline=false", "teacher.train.epochs=1",
                                    "method={name: dafl}"])
    run(cfg, echo=lambda _: None)
    grid = cfg.run_dir / "seed-0" / "student" / "generated-samples.png"
    assert grid.is_file() and grid.read_bytes()[:4] == b"\x89PNG"
    assert "What the method made" in (cfg.run_dir / "report.html").read_text()
