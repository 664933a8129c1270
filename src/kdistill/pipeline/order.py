"""`kdistill run`: teach -> cache -> baseline -> distill -> evaluate -> compress -> report.

`run` reads as that order; each stage is a short function below. Stages that train are
fingerprinted and resumable (`kdistill.pipeline.stages`): a stage whose fingerprint matches is
skipped (a re-run only re-evaluates), one whose recipe changed is redone, one that was
interrupted resumes from its last checkpoint. What a kind of data means (outputs, scores,
samples) is its task's (`kdistill.tasks`); what a method needs is the method's. Nothing here
compares a task or a method name.

Under torchrun every rank runs this same code: files (markers, models, the teacher cache,
reports) are written by rank 0 through `distributed.on_main`, which every rank calls in the
same order, and rank 0 alone evaluates and reports.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill import devices, distributed
from kdistill.build import (
    add_unlabelled,
    build_data,
    build_network,
    check_devices,
    check_views,
)
from kdistill.cache_key import fingerprint_model
from kdistill.config import RunConfig, TeacherConfig, dump_config
from kdistill.data.transfer import describe as describe_transfer_set
from kdistill.errors import ConfigError
from kdistill.io import atomic_write_text
from kdistill.methods import Method, build_method
from kdistill.pipeline.health import run_warnings
from kdistill.pipeline.stages import finetune_stage, initial_student, student_stage, teacher_stage
from kdistill.pipeline.teaching import RunDataTools, teacher_outputs
from kdistill.planning import plan
from kdistill.rundir import RunDirectory
from kdistill.tasks import Evaluated, Evaluation, Task, task_of
from kdistill.teachers import EnsembleTeacher, Teacher, freeze_teacher
from kdistill.types import DataSplits, Echo


@dataclass
class RunResult:
    run_dir: Path
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # role -> per seed
    teacher_forwards: int = 0  # teacher network calls during distillation (0 with the cache)


@dataclass
class Run:
    """What every stage of one run reads: the recipe, its directory, the data and its task."""

    cfg: RunConfig
    rd: RunDirectory  # paths inside the run directory, checked (no `..`, no links)
    splits: DataSplits  # the data the baseline trains on (and evaluation scores)
    task: Task
    method: Method  # the recipe's method, for what it declares (fresh ones train)
    echo: Echo

    @property
    def run_dir(self) -> Path:
        return self.rd.root


@dataclass
class Teachers:
    """The trained (or loaded) teachers, their weights' hashes, and their outputs' source."""

    roles: list[str]
    models: list[nn.Module]
    prints: list[str]
    kd_splits: DataSplits  # the data the distilled students train on (method.prepare_data)
    source: Teacher | None = None


def run(cfg: RunConfig, *, echo: Echo = print) -> RunResult:
    """Run every stage of a recipe and write `report.md`; returns the evaluated rows.

    Under torchrun (WORLD_SIZE > 1) this joins the process group, trains with DDP and leaves
    the group at the end; only rank 0's result holds rows (the others return none)."""
    joined = not distributed.info().enabled
    # The process group's backend follows the device: nccl for CUDA, gloo for the CPU.
    dist = distributed.init_from_env(cfg.train.device)
    joined = joined and dist.enabled  # this call set the group up, so it takes it down
    try:
        check_launch(cfg)  # before the run directory exists: nothing to undo
        if dist.main and cfg.memory_plan:  # before anything is loaded: the process's baseline
            echo(plan(cfg, device=devices.resolve(cfg.train.device)).one_line())
        # Rank 0 holds the run directory's lock: a second run on the same name stops at once.
        with RunDirectory.open(cfg.output_dir, cfg.name, lock=dist.main) as rd:
            if rd.stale_pid is not None:
                echo(f"run: took over the lock of a run that ended without releasing it "
                     f"(pid {rd.stale_pid})")
            return _run(cfg, rd, echo if dist.main else (lambda _line: None))
    except BaseException:
        if joined:  # another rank may be waiting in a collective: no barrier, just leave
            distributed.shutdown(barrier=False)
            joined = False
        raise
    finally:
        if joined:
            distributed.shutdown()


def _run(cfg: RunConfig, rd: RunDirectory, echo: Echo) -> RunResult:
    r = prepare(cfg, rd, echo)
    teachers = teach(r)
    teachers.source = cache(r, teachers)
    students, forwards = distill(r, teachers)
    if not distributed.info().main:
        return RunResult(r.run_dir, teacher_forwards=forwards)
    evaluated = evaluate(r, teachers, students)
    chain = compress(r, teachers, students, evaluated)
    report(r, evaluated, chain)
    return RunResult(r.run_dir, evaluated.rows, teacher_forwards=forwards)


def prepare(cfg: RunConfig, rd: RunDirectory, echo: Echo) -> Run:
    """The run directory with the resolved recipe, the data, and checks made before training."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = rd.root
    distributed.on_main(lambda: atomic_write_text(rd.path("config.yaml"), dump_config(cfg)))
    splits = add_unlabelled(build_data(cfg.data, transfer=cfg.transfer, run_dir=run_dir), cfg)
    task = task_of(splits)
    echo(f"data: {task.describe(splits)}")
    for note in splits.notes:  # duplicates across splits, skipped files, converted images
        echo(note)  # each note names its own kind (`data: ...`)
    if cfg.transfer_set is not None:
        check_views(splits, cfg.transfer_set)  # before any teacher trains
        extra = 0 if splits.unlabelled_x is None else len(splits.unlabelled_x)
        echo(describe_transfer_set(cfg.transfer_set, len(splits.train_x), extra))
    distributed.on_main(lambda: task.save_artifacts(
        splits, lambda name, text: atomic_write_text(rd.path(name), text)))
    task.check_recipe(cfg)
    return Run(cfg, rd, splits, task, build_method(cfg.method), echo)


def check_launch(cfg: RunConfig) -> None:
    """What the recipe cannot know: the devices this machine has, and stages that run in one
    process (which refuse torchrun)."""
    check_devices(cfg)
    if not distributed.info().enabled:
        return
    if cfg.compress:  # the chain runs after evaluation, which rank 0 does alone
        raise ConfigError("compress", "the compression chain runs in one process (without "
                                      "torchrun); remove `compress:` or run it so")
    if cfg.transfer and cfg.transfer.finetune:  # fine-tuning happens in the evaluate stage
        raise ConfigError("transfer.finetune", "fine-tuning runs in one process (without "
                          "torchrun); set transfer.finetune: null or run it so")


def teach(r: Run) -> Teachers:
    """Train (or load) every teacher; the method then makes its data from the first one."""
    cfg = r.cfg
    configs: list[tuple[str, str, TeacherConfig]] = [("teacher", "teacher", cfg.teacher)]
    configs += [(f"teacher-{k + 2}", f"more_teachers.{k}", t)
                for k, t in enumerate(cfg.more_teachers)]
    # Each frozen teacher sits on its own device (teacher.device, else train.device): its
    # cache pass and online outputs run there; the engine brings outputs to the student.
    models = [teacher_stage(cfg, tcfg, r.splits, r.rd, role, where, r.echo).to(
                  devices.resolve(tcfg.device or cfg.train.device, where=f"{where}.device"))
              for role, where, tcfg in configs]
    build_network(cfg.student.model, r.splits, where="student.model")  # fail fast, before work
    # The teacher's targets where the data has no labels (sentence embeddings).
    r.splits = r.task.prepare_evaluation(r.splits, models[0], batch_size=cfg.eval.batch_size)
    # Hashed once: a pretrained LM teacher is hundreds of MB, and every seed's stage uses it.
    prints = [fingerprint_model(m) for m in models]
    # The data the distilled student trains on: the method may make it from the trained
    # teacher (sequence-level KD: its translations); the baseline keeps the original.
    tools = RunDataTools(r.rd.path("cache", "method"), r.task, r.echo)
    kd_splits = distributed.on_main(lambda: r.method.prepare_data(r.splits, models[0], tools))
    return Teachers([role for role, _, _ in configs], models, prints, kd_splits)


def cache(r: Run, teachers: Teachers) -> Teacher | None:
    """Each teacher's outputs: cached once over the training set, or its live network."""
    sources = [teacher_outputs(r.cfg, r.method, teachers.kd_splits, model,
                               r.rd.path("cache", role), r.echo, fp, role=role)
               for model, role, fp in zip(teachers.models, teachers.roles, teachers.prints,
                                          strict=True)]
    if len(sources) > 1:
        return EnsembleTeacher([s for s in sources if s is not None])
    return sources[0]


def distill(r: Run, teachers: Teachers) -> tuple[dict[str, list[nn.Module]], int]:
    """For each seed: the student alone (baseline), then the distilled student (and, for
    born-again networks, each generation taught by the one before). Returns the models by
    role and how many batches went through a teacher network."""
    cfg = r.cfg
    roles = ["student", *(f"student-gen{g}" for g in range(2, cfg.generations + 1))]
    models: dict[str, list[nn.Module]] = {"baseline": [], **{role: [] for role in roles}}
    forwards = 0
    for seed in cfg.train.seeds:
        if cfg.baseline:
            models["baseline"].append(
                student_stage("baseline", cfg, r.splits, seed, r.rd, None, r.echo))
        source, source_models, prints = teachers.source, teachers.models, teachers.prints
        for role in roles:  # born-again: each generation teaches the next (arXiv:1805.04770)
            before = source.forwards if source is not None else 0
            model = student_stage(role, cfg, teachers.kd_splits, seed, r.rd, source,
                                  r.echo, source_models, prints)
            models[role].append(model)
            # Sources are shared across seeds and count cumulatively: add this stage's calls.
            forwards += (source.forwards - before) if source is not None else 0
            if role != roles[-1]:
                source_models = [freeze_teacher(copy.deepcopy(model))]
                prints = [fingerprint_model(source_models[0])]
                # The next generation's teacher sits where the run's teachers do.
                source_models[0].to(devices.model_device(teachers.models[0]))
                source = teacher_outputs(cfg, r.method, teachers.kd_splits, source_models[0],
                                         r.rd.path(f"seed-{seed}", role, "cache"), r.echo,
                                         prints[0], role=f"{role} (seed {seed})")
    return models, forwards


def evaluate(r: Run, teachers: Teachers, students: dict[str, list[nn.Module]]) -> Evaluated:
    """Every model on the test split, by the data's task; written to eval.json."""
    r.echo("evaluate: test set, size and speed")
    cfg, seeds = r.cfg, list(r.cfg.train.seeds)
    models = {**{role: [m] for role, m in zip(teachers.roles, teachers.models, strict=True)},
              **{role: trained for role, trained in students.items() if trained}}

    def weights(role: str, index: int) -> Path:
        stage = (role,) if role in teachers.roles else (f"seed-{seeds[index]}", role)
        return r.rd.path(*stage, "model.safetensors")

    def finetune(role: str, model: nn.Module, seed: int, task: DataSplits) -> nn.Module:
        return finetune_stage(role, model, cfg, task, seed, r.rd, r.echo)

    evaluated = r.task.evaluate(Evaluation(
        cfg=cfg, splits=r.splits, models=models, teacher_roles=teachers.roles, seeds=seeds,
        weights=weights, initial_student=lambda seed: initial_student(cfg, r.splits, seed),
        finetune=finetune, echo=r.echo))
    atomic_write_text(r.rd.path("eval.json"), json.dumps(evaluated.rows, indent=2))
    if evaluated.samples:
        atomic_write_text(r.rd.path("samples.json"), json.dumps(evaluated.samples, indent=2))
    stages = {f"{role} (seed {seed})" if role not in teachers.roles else role:
              weights(role, i).parent for role, trained in models.items()
              for i, seed in enumerate(seeds[: len(trained)])}
    evaluated.warnings = run_warnings(r.task, evaluated.rows, r.splits, stages)
    for line in evaluated.warnings:
        r.echo(f"warning: {line}")
    atomic_write_text(r.rd.path("warnings.json"), json.dumps(evaluated.warnings, indent=2))
    return evaluated


def compress(r: Run, teachers: Teachers, students: dict[str, list[nn.Module]],
             evaluated: Evaluated) -> list[dict[str, Any]]:
    """The `compress:` stages on the first seed's distilled student, each evaluated."""
    cfg = r.cfg
    if not cfg.compress:
        return []
    from kdistill.compress import run_chain  # torch.ao and onnx: imported only when used

    seed = cfg.train.seeds[0]
    r.echo(f"compress: {len(cfg.compress)} stage(s) on the seed-{seed} student")
    first = {**evaluated.rows["student"][0], "stage": "distilled student", "what": "",
             "runtime": "torch"}
    # Pruning, int8 kernels and ONNX export are CPU work: the chain starts from CPU copies
    # (its fine-tuning settings are made CPU ones by compress.finetune.finetune_config).
    cpu = torch.device("cpu")
    return [first, *run_chain(cfg.compress, student=copy.deepcopy(students["student"][0]).to(cpu),
                              teacher=copy.deepcopy(teachers.models[0]).to(cpu), splits=r.splits,
                              run_dir=r.run_dir, train_cfg=cfg.train, echo=r.echo,
                              eval_cfg=cfg.eval, seed=seed)]


def report(r: Run, evaluated: Evaluated, chain: list[dict[str, Any]]) -> None:
    """report.md and the self-contained report.html."""
    from kdistill.report.html import write_html_report  # matplotlib: ~0.6 s to import
    from kdistill.report.markdown import write_report

    write_report(r.run_dir, r.cfg, evaluated.rows, samples=evaluated.samples, compress=chain,
                 warnings=evaluated.warnings)
    write_html_report([r.run_dir])
