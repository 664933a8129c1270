"""`kdistill run`: teach -> cache -> baseline -> distill -> evaluate -> report.

Each stage writes its artifact into the run directory with a fingerprint of the recipe parts
it depends on. A stage whose fingerprint matches is skipped (a re-run only re-evaluates); one
whose recipe changed is redone; one that was interrupted resumes from its last checkpoint.

Under torchrun every rank runs this same code: files (markers, models, the teacher cache,
reports) are written by rank 0 through `distributed.on_main`, which every rank calls in the
same order, and rank 0 alone evaluates and reports. The stages themselves (fingerprints,
skipping, resuming) are in `kdistill.pipeline.stages`; this module is their order.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill import distributed
from kdistill.build import (
    build_data,
    build_network,
    build_transfer_data,
    check_vocabulary,
)
from kdistill.cache import fingerprint_model
from kdistill.config import RunConfig, dump_config
from kdistill.errors import ConfigError
from kdistill.evaluate import model_report, predict
from kdistill.io import atomic_write_text
from kdistill.methods import build_method
from kdistill.pipeline.data_tools import RunDataTools
from kdistill.pipeline.stages import (
    TOKEN_TASKS,
    Echo,
    finetune_stage,
    initial_student,
    student_stage,
    teacher_source,
    teacher_stage,
)
from kdistill.report.markdown import write_report
from kdistill.tasks.causal_lm import lm_report, lm_samples, next_token_predictions
from kdistill.tasks.embedding import evaluate_encoders, with_teacher_targets
from kdistill.tasks.seq2seq import seq2seq_report, translation_samples
from kdistill.teachers import EnsembleTeacher, Teacher, freeze_teacher


@dataclass
class RunResult:
    run_dir: Path
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # role -> per seed
    teacher_forwards: int = 0  # teacher network calls during distillation (0 with the cache)


def run(cfg: RunConfig, *, echo: Echo = print) -> RunResult:
    """Run every stage of a recipe and write `report.md`; returns the evaluated rows.

    Under torchrun (WORLD_SIZE > 1) this joins the process group, trains with DDP and leaves
    the group at the end; only rank 0's result holds rows (the others return none)."""
    joined = not distributed.info().enabled
    dist = distributed.init_from_env()
    joined = joined and dist.enabled  # this call set the group up, so it takes it down
    try:
        return _run(cfg, echo if dist.main else (lambda _line: None))
    except BaseException:
        if joined:  # another rank may be waiting in a collective: no barrier, just leave
            distributed.shutdown(barrier=False)
            joined = False
        raise
    finally:
        if joined:
            distributed.shutdown()


def _run(cfg: RunConfig, echo: Echo) -> RunResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.on_main(lambda: atomic_write_text(run_dir / "config.yaml", dump_config(cfg)))
    splits = build_data(cfg.data, transfer=cfg.transfer)
    if splits.task == "seq2seq":
        echo(f"data: {splits.name}: {len(splits.train_x)} train / {len(splits.val_x)} val / "
             f"{len(splits.test_x)} test sentence pairs, {splits.input_shape[1]} tokens per "
             f"side, joint BPE vocabulary {splits.num_classes:,}")
        distributed.on_main(lambda: atomic_write_text(run_dir / "tokenizer.json",
                                                      splits.tokenizer_json or ""))
    elif splits.task == "causal_lm":
        echo(f"data: {splits.name}: {splits.train_x.numel():,} train / {splits.val_x.numel():,} "
             f"val / {splits.test_x.numel():,} test tokens in blocks of {splits.input_shape[0]}, "
             f"vocabulary {splits.num_classes:,}")
    else:
        echo(f"data: {splits.name}: {len(splits.train_x)} train / {len(splits.val_x)} val / "
             f"{len(splits.test_x)} test, " + ("unlabelled texts" if splits.task == "embedding"
                                               else f"{splits.num_classes} classes"))
    if cfg.compress and distributed.info().enabled:
        # Say so before training, not after: the chain needs one process and class labels.
        raise ConfigError("compress", "the compression chain runs on classification data in "
                          "one process (without torchrun); remove `compress:` or run it so")
    if cfg.transfer and cfg.transfer.finetune and distributed.info().enabled:
        # Fine-tuning happens in the evaluate stage, which rank 0 runs alone.
        raise ConfigError("transfer.finetune", "fine-tuning runs in one process (without "
                          "torchrun); set transfer.finetune: null or run it so")
    check_vocabulary(cfg)
    teacher_roles = ["teacher", *(f"teacher-{k + 2}" for k in range(len(cfg.more_teachers)))]
    teacher_models = [
        teacher_stage(cfg, tcfg, splits, run_dir, role, where, echo)
        for role, tcfg, where in zip(
            teacher_roles, [cfg.teacher, *cfg.more_teachers],
            ["teacher", *(f"more_teachers.{k}" for k in range(len(cfg.more_teachers)))],
            strict=True)
    ]
    teacher_model = teacher_models[0]
    # Fail fast on a mismatched student before any expensive work.
    build_network(cfg.student.model, splits, where="student.model")
    if splits.task == "embedding":  # no labels: held-out texts are scored against the teacher
        splits = with_teacher_targets(splits, teacher_model, batch_size=cfg.eval.batch_size)
    # Hashed once: a pretrained LM teacher is hundreds of MB, and every seed's stage uses it.
    teacher_prints = [fingerprint_model(m) for m in teacher_models]
    # The data the distilled student trains on: the method may make it from the trained
    # teacher (sequence-level KD: its translations); the baseline keeps the original.
    kd_splits = distributed.on_main(lambda: build_method(cfg.method).prepare_data(
        splits, teacher_model, RunDataTools(run_dir / "cache" / "method", echo)))
    sources = [teacher_source(cfg, kd_splits, m, run_dir / "cache" / role, echo, fp)
               for m, role, fp in zip(teacher_models, teacher_roles, teacher_prints, strict=True)]
    teacher: Teacher | None = sources[0]
    if len(sources) > 1:
        teacher = EnsembleTeacher([s for s in sources if s is not None])
    forwards = 0

    roles = ["student", *(f"student-gen{g}" for g in range(2, cfg.generations + 1))]
    models: dict[str, list[nn.Module]] = {
        **{role: [m] for role, m in zip(teacher_roles, teacher_models, strict=True)},
        "baseline": [], **{role: [] for role in roles}}
    for seed in cfg.train.seeds:
        if cfg.baseline:
            models["baseline"].append(
                student_stage("baseline", cfg, splits, seed, run_dir, None, echo))
        source, source_models, source_prints = teacher, teacher_models, teacher_prints
        for role in roles:  # born-again: each generation teaches the next (arXiv:1805.04770)
            before = source.forwards if source is not None else 0
            model = student_stage(role, cfg, kd_splits, seed, run_dir, source, echo,
                                   source_models, source_prints)
            models[role].append(model)
            # Sources are shared across seeds and count cumulatively: add this stage's calls.
            forwards += (source.forwards - before) if source is not None else 0
            if role != roles[-1]:
                source_models = [freeze_teacher(copy.deepcopy(model))]
                source_prints = [fingerprint_model(source_models[0])]
                source = teacher_source(cfg, kd_splits, source_models[0],
                                         run_dir / f"seed-{seed}" / role / "cache", echo,
                                         source_prints[0])

    if not distributed.info().main:
        return RunResult(run_dir=run_dir, teacher_forwards=forwards)
    echo("evaluate: test set, size and speed")
    if splits.task == "embedding":  # no classes: agreement, probe, fine-tuning (transfer.py)
        task = build_transfer_data(cfg)
        finetune = None
        if task is not None and cfg.transfer is not None and cfg.transfer.finetune is not None:
            def finetune(role: str, model: nn.Module, seed: int) -> nn.Module:
                return finetune_stage(role, model, cfg, task, seed, run_dir, echo)
        rows = evaluate_encoders(
            splits=splits, task=task, transfer=cfg.transfer, eval_cfg=cfg.eval,
            teacher=teacher_model, teacher_weights=run_dir / "teacher" / "model.safetensors",
            students=models["student"], seeds=cfg.train.seeds,
            student_weights=lambda seed: run_dir / f"seed-{seed}" / "student" / "model.safetensors",
            untrained=lambda seed: initial_student(cfg, splits, seed), finetune=finetune,
            echo=echo)
        atomic_write_text(run_dir / "eval.json", json.dumps(rows, indent=2))
        write_report(run_dir, cfg, rows)
        from kdistill.report.html import write_html_report

        write_html_report([run_dir])
        return RunResult(run_dir=run_dir, rows=rows, teacher_forwards=forwards)
    lm = splits.task in TOKEN_TASKS
    lm_batch = min(cfg.eval.batch_size, cfg.train.batch_size)
    if lm:  # the teacher's next-token argmax, not (N, T, V) logits
        teacher_logits = next_token_predictions(teacher_model, splits.test_x, batch_size=lm_batch)
    else:
        teacher_logits = predict(teacher_model, splits.test_x, batch_size=cfg.eval.batch_size)
    result = RunResult(run_dir=run_dir, teacher_forwards=forwards)
    hypotheses: dict[str, list[str]] = {}
    for role, trained in models.items():
        if not trained:  # e.g. baseline: false
            continue
        result.rows[role] = []
        for i, model in enumerate(trained):
            is_teacher = role in teacher_roles
            seed_dir = run_dir / role if is_teacher else (
                run_dir / f"seed-{cfg.train.seeds[i]}" / role)
            if splits.task == "seq2seq":  # BLEU / chrF of its translations, and speed
                row, translations = seq2seq_report(
                    model, seed_dir / "model.safetensors", splits, teacher_predictions=None
                    if is_teacher else teacher_logits, beam=cfg.eval.beam,
                    length_penalty=cfg.eval.length_penalty, batch_size=lm_batch)
                hypotheses.setdefault(role, translations)  # the first seed's, for samples
            elif lm:
                row = lm_report(model, seed_dir / "model.safetensors", splits.test_x,
                                splits.test_y, teacher_predictions=None if is_teacher else
                                teacher_logits, batch_size=lm_batch,
                                repeats=cfg.eval.latency_repeats)
            else:
                row = model_report(
                    model, seed_dir / "model.safetensors", splits.test_x, splits.test_y,
                    teacher_logits=None if is_teacher else teacher_logits,
                    batch_size=cfg.eval.batch_size, ece_bins=cfg.eval.ece_bins,
                    throughput_batch=cfg.eval.throughput_batch, repeats=cfg.eval.latency_repeats,
                )
            row["seed"] = None if is_teacher else cfg.train.seeds[i]
            result.rows[role].append(row)
    atomic_write_text(run_dir / "eval.json", json.dumps(result.rows, indent=2))
    samples = (translation_samples(splits, hypotheses, count=cfg.eval.samples) if hypotheses
               else lm_samples(cfg.data.tokenizer, splits.test_x, splits.test_y, models,
                               count=cfg.eval.samples, new_tokens=cfg.eval.sample_tokens)
               if lm and cfg.eval.samples else [])
    if samples:
        atomic_write_text(run_dir / "samples.json", json.dumps(samples, indent=2))
    chain: list[dict[str, Any]] = []
    if cfg.compress:  # prune / distill / quantize / export the first seed's distilled student
        from kdistill.compress import run_chain
        from kdistill.methods.kd import KDConfig

        echo(f"compress: {len(cfg.compress)} stage(s) on the seed-{cfg.train.seeds[0]} student")
        kd = cfg.method if isinstance(cfg.method, KDConfig) else KDConfig()
        chain = [{**result.rows["student"][0], "stage": "distilled student", "what": "",
                  "runtime": "torch"},
                 *run_chain(cfg.compress, student=models["student"][0], teacher=teacher_model,
                            splits=splits, run_dir=run_dir, train_cfg=cfg.train, echo=echo,
                            kd=kd, eval_cfg=cfg.eval, seed=cfg.train.seeds[0])]
    write_report(run_dir, cfg, result.rows, samples=samples, compress=chain)
    from kdistill.report.html import write_html_report  # matplotlib: ~0.6 s to import

    write_html_report([run_dir])
    return result
