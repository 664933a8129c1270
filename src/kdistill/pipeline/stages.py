"""The stages of `kdistill run` that train, each a fingerprinted, resumable step.

A stage directory holds `stage.json` (the fingerprint of the recipe parts and data it depends
on, and whether it completed) and, once complete, `model.safetensors`. `stage_done` skips a
finished stage with the same fingerprint, wipes one whose recipe changed, and lets an
interrupted one resume from its checkpoints; `finish_stage` writes the model, then marks it
complete. Files are written by rank 0 alone (`distributed.on_main`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill import distributed
from kdistill.build import build_network, build_optimizer, build_train_loader
from kdistill.cache_key import fingerprint_model
from kdistill.config import RunConfig, TeacherConfig, TrainSettings, TransferSetConfig
from kdistill.data import DataSplits
from kdistill.data.transfer import views_key
from kdistill.engine import train
from kdistill.errors import ConfigError
from kdistill.io import atomic_write_text, file_digest, read_json, save_model_atomic
from kdistill.logger import MetricsLogger
from kdistill.methods import build_method
from kdistill.methods.base import Method
from kdistill.methods.ce import CEConfig
from kdistill.rundir import RunDirectory
from kdistill.tasks import task_of
from kdistill.tasks.embedding import EncoderWithHead, with_head
from kdistill.teachers import CachedTeacher, EnsembleTeacher, Teacher, freeze_teacher
from kdistill.types import Echo
from kdistill.weights import load_weights

REDO = "delete it and run again to redo the stage that wrote it"


def fingerprint_of(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: str | None) -> str | None:
    """Content hash of a weights file named by the recipe (a changed file redoes the stage);
    read in chunks, and once per file version however many stages and seeds ask."""
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return file_digest(Path(path))  # keyed by the file's version: a rewritten file is new


# Settings that change how a run is logged or where it runs, not the weights it produces (a
# device or compilation changes float rounding only: a finished stage is not redone for it).
_NOT_WEIGHTS = {"seeds", "log_every", "eval_every_epochs", "checkpoint_every_steps", "device",
                "compile", "strategy"}


def training(cfg: TrainSettings) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=_NOT_WEIGHTS)


def stage_done(stage_dir: Path, fingerprint: str, echo: Echo) -> bool:
    """True if the stage finished with this fingerprint; wipe it if the recipe changed."""
    marker = stage_dir / "stage.json"
    if marker.is_file():
        try:
            info = read_json(marker, what="the stage marker", hint=REDO)
        except ConfigError:  # torn, or not a marker (`null`, `[]`): the stage is not done
            info = {}
        if info.get("fingerprint") == fingerprint:
            return bool(info.get("complete")) and (stage_dir / "model.safetensors").is_file()
        echo(f"{stage_dir.name}: recipe changed since the last run; redoing this stage")
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "complete": False}))
    return False


def finish_stage(stage_dir: Path, fingerprint: str, model: nn.Module) -> None:
    save_model_atomic(model, stage_dir / "model.safetensors")
    atomic_write_text(stage_dir / "stage.json",
                      json.dumps({"fingerprint": fingerprint, "complete": True}))
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # the model file supersedes


def train_model(
    model: nn.Module, teacher: Teacher | None, method: Method, splits: DataSplits,
    cfg: TrainSettings, seed: int, stage_dir: Path, echo: Echo, where: str,
    teacher_model: nn.Module | None = None, tensorboard: bool = False,
    transfer_set: TransferSetConfig | None = None,
) -> None:
    """Train `model` with `method` through the one engine, checkpointing into `stage_dir`;
    on the views of `transfer_set` when given (the students of such a run)."""
    loader = build_train_loader(splits, cfg, seed=seed, where=where, transfer_set=transfer_set,
                                unlabelled=teacher is not None)
    # Adapters (and per-sample buffers) exist before the optimizer is built.
    method.setup(model, teacher_model, splits.train_x[:2], num_samples=len(loader.x))
    optimizer = build_optimizer([*model.parameters(), *method.optimizer_parameters()],
                                cfg.optimizer)
    task = task_of(splits)

    def evaluate() -> dict[str, float]:
        return task.validation_scores(model, splits, batch_size=cfg.batch_size)

    tb_dir = stage_dir / "tensorboard" if tensorboard else None  # opened on first log: rank 0
    with MetricsLogger(stage_dir / "metrics.jsonl", tensorboard_dir=tb_dir) as logger:
        train(model, teacher, method, loader, optimizer, cfg, seed=seed, evaluate=evaluate,
              logger=logger, checkpoint_dir=stage_dir / "checkpoints", progress_bar=True,
              echo=lambda line: echo(f"  {stage_dir.parent.name}/{stage_dir.name} {line}"))


def teacher_stage(cfg: RunConfig, tcfg_all: TeacherConfig, splits: DataSplits,
                  rd: RunDirectory, role: str, where: str, echo: Echo) -> nn.Module:
    stage_dir = rd.path(role)
    tcfg = tcfg_all.train
    # splits.fingerprint: the data's content, not only its recipe (a regenerated JSONL file,
    # another tokenizer version or Python's own docstrings change the tokens, not the text).
    fingerprint = fingerprint_of(
        cfg.data.model_dump(), splits.fingerprint, tcfg_all.model.model_dump(),
        file_hash(tcfg_all.model.weights),
        None if tcfg is None else [training(tcfg), tcfg.seed],
    )
    if tcfg is not None:
        torch.manual_seed(tcfg.seed)  # the teacher's initial weights
    model = build_network(tcfg_all.model, splits, where=f"{where}.model")
    if distributed.on_main(lambda: stage_done(stage_dir, fingerprint, echo)):
        load_weights(model, stage_dir / "model.safetensors", hint=REDO)
        echo(f"{role}: done earlier, loaded")
    elif tcfg is None:
        echo(f"{role}: using the model as loaded ({where}.train is null)")
        distributed.on_main(lambda: finish_stage(stage_dir, fingerprint, model))
    else:
        echo(f"{role}: training {tcfg_all.model.arch} for {tcfg.epochs} epoch(s)")
        # Trains on teacher.train.device, else where the teacher will sit, else train.device.
        tcfg = tcfg.model_copy(update={"device": tcfg.device or tcfg_all.device
                                       or cfg.train.device})
        train_model(model, None, build_method(CEConfig()), splits, tcfg, tcfg.seed, stage_dir,
                    echo, f"{where}.train", tensorboard=cfg.logging.tensorboard)
        distributed.on_main(lambda: finish_stage(stage_dir, fingerprint, model))
    return freeze_teacher(model)


def student_fingerprint(role: str, cfg: RunConfig, splits: DataSplits, seed: int,
                        method: Method, teacher: Teacher | None,
                        teacher_prints: list[str] | None) -> str:
    """What a student stage depends on: data, model, training, method, its views, and for a
    distilled student the teachers' weights and how their outputs are stored."""
    parts: list[Any] = [cfg.data.model_dump(), splits.fingerprint, cfg.student.model.model_dump(),
                        file_hash(cfg.student.model.weights), training(cfg.train), seed,
                        method.cfg.model_dump(mode="json")]
    if cfg.transfer_set is not None:  # other views, another training (alone or distilled)
        spec = cfg.transfer_set.spec()
        # The student alone never trains on the unlabelled inputs, but its swaps draw from
        # word classes built from them too: then those inputs shape its views.
        sees_unlabelled = role != "baseline" or bool(cfg.transfer_set.swap_prob)
        if not sees_unlabelled:
            spec.pop("unlabelled", None)
        parts.append(spec)
        if sees_unlabelled and splits.unlabelled_x is not None:  # those inputs themselves
            parts.append(views_key(splits, cfg.transfer_set))
    if role != "baseline" and teacher_prints:
        # The teachers' actual weights, not their recipe text, and how outputs are stored.
        stored: Any = "online"
        if isinstance(teacher, CachedTeacher | EnsembleTeacher):
            stored = cfg.cache.dtype if cfg.cache.topk is None else [cfg.cache.dtype,
                                                                      cfg.cache.topk]
            if cfg.cache.tail_samples:  # other targets, another student (only then: the
                # fingerprints of plain top-k students stay as they were)
                stored += [cfg.cache.tail_samples, cfg.cache.tail_sampling]
        parts += [teacher_prints, stored]
    return fingerprint_of(*parts)


def student_stage(
    role: str, cfg: RunConfig, splits: DataSplits, seed: int, rd: RunDirectory,
    teacher: Teacher | None, echo: Echo, teacher_models: list[nn.Module] | None = None,
    teacher_prints: list[str] | None = None,
) -> nn.Module:
    method = build_method(CEConfig() if role == "baseline" else cfg.method)
    fingerprint = student_fingerprint(role, cfg, splits, seed, method, teacher, teacher_prints)
    stage_dir = rd.path(f"seed-{seed}", role)
    torch.manual_seed(seed)  # same initial weights for baseline and student of one seed
    model = build_network(cfg.student.model, splits, where="student.model")
    if distributed.on_main(lambda: stage_done(stage_dir, fingerprint, echo)):
        load_weights(model, stage_dir / "model.safetensors", hint=REDO)
        echo(f"{role} (seed {seed}): done earlier, loaded")
        return model
    echo(f"{role} (seed {seed}): training with method '{method.cfg.name}'")
    train_model(model, teacher, method, splits, cfg.train, seed, stage_dir, echo, "train",
                teacher_model=teacher_models[0] if teacher_models else None,
                tensorboard=cfg.logging.tensorboard, transfer_set=cfg.transfer_set)
    distributed.on_main(lambda: method.save_artifacts(stage_dir))  # e.g. generated samples
    distributed.on_main(lambda: finish_stage(stage_dir, fingerprint, model))
    return model


def finetune_stage(role: str, encoder: nn.Module, cfg: RunConfig, task: DataSplits, seed: int,
                    rd: RunDirectory, echo: Echo) -> EncoderWithHead:
    """General distillation: a copy of `encoder` + a new linear head trained with CE on the
    transfer task (`transfer.finetune`), as a fingerprinted, resumable stage."""
    assert cfg.transfer is not None and cfg.transfer.finetune is not None
    ft = cfg.transfer.finetune
    stage_dir = rd.path(f"seed-{seed}", f"finetune-{role}")
    fingerprint = fingerprint_of(fingerprint_model(encoder), task.fingerprint, training(ft), seed,
                               cfg.transfer.model_dump(mode="json"))
    torch.manual_seed(seed)  # the head's initial weights: the same for every encoder of a seed
    model = with_head(copy.deepcopy(encoder), task.num_classes, task.train_x,
                      dropout=cfg.transfer.dropout)
    if distributed.on_main(lambda: stage_done(stage_dir, fingerprint, echo)):
        load_weights(model, stage_dir / "model.safetensors", hint=REDO)
        echo(f"finetune-{role} (seed {seed}): done earlier, loaded")
        return model
    echo(f"finetune-{role} (seed {seed}): {ft.epochs} epoch(s) with a new head on '{task.name}'")
    ft = ft.model_copy(update={"device": ft.device or cfg.train.device})
    train_model(model, None, build_method(CEConfig()), task, ft, seed, stage_dir, echo,
                "transfer.finetune", tensorboard=cfg.logging.tensorboard)
    distributed.on_main(lambda: finish_stage(stage_dir, fingerprint, model))
    return model


def initial_student(cfg: RunConfig, splits: DataSplits, seed: int) -> nn.Module:
    """The student exactly as `student_stage` initialises it for `seed`."""
    torch.manual_seed(seed)
    return build_network(cfg.student.model, splits, where="student.model")
