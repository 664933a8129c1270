"""`kdistill run`: teach -> cache -> baseline -> distill -> evaluate -> report.

Each stage writes its artifact into the run directory with a fingerprint of the recipe parts
it depends on. A stage whose fingerprint matches is skipped (a re-run only re-evaluates); one
whose recipe changed is redone; one that was interrupted resumes from its last checkpoint.

Under torchrun every rank runs this same code: files (markers, models, the teacher cache,
reports) are written by rank 0 through `distributed.on_main`, which every rank calls in the
same order, and rank 0 alone evaluates and reports.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill import distributed
from kdistill.build import (
    build_data,
    build_network,
    build_optimizer,
    build_train_loader,
    build_transfer_data,
    check_task,
    check_vocabulary,
)
from kdistill.cache import (
    CacheKey,
    TeacherCache,
    build_cache,
    cache_bytes,
    feature_shapes,
    fingerprint_model,
)
from kdistill.checkpoint import atomic_write_text, load_weights, save_model_atomic
from kdistill.config import RunConfig, TeacherConfig, TrainConfig, dump_config
from kdistill.data import DataSplits
from kdistill.engine import train
from kdistill.errors import ConfigError
from kdistill.evaluate import classification_scores, model_report, predict
from kdistill.evaluate_lm import (
    lm_report,
    lm_samples,
    lm_scores,
    next_token_predictions,
)
from kdistill.evaluate_seq2seq import seq2seq_report, translation_samples
from kdistill.methods import build_method
from kdistill.methods.base import Method
from kdistill.methods.ce import CEConfig
from kdistill.metrics import MetricsLogger
from kdistill.report.markdown import write_report
from kdistill.teachers import (
    CachedTeacher,
    EnsembleTeacher,
    OnlineTeacher,
    Teacher,
    freeze_teacher,
)
from kdistill.transfer import (
    EncoderWithHead,
    embedding_scores,
    evaluate_encoders,
    with_head,
    with_teacher_targets,
)

Echo = Callable[[str], None]
TOKEN_TASKS = ("causal_lm", "seq2seq")  # logits (B, T, V), labels (B, T), shifted


@dataclass
class RunResult:
    run_dir: Path
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # role -> per seed
    teacher_forwards: int = 0  # teacher network calls during distillation (0 with the cache)


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_hash(path: str | None) -> str | None:
    """Content hash of a weights file named by the recipe (a changed file redoes the stage)."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Settings that change how a run is logged, not the weights it produces.
_NOT_WEIGHTS = {"seeds", "log_every", "eval_every_epochs", "checkpoint_every_steps"}


def _training(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=_NOT_WEIGHTS)


def _stage_done(stage_dir: Path, fingerprint: str, echo: Echo) -> bool:
    """True if the stage finished with this fingerprint; wipe it if the recipe changed."""
    marker = stage_dir / "stage.json"
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except json.JSONDecodeError:  # a torn marker: treat the stage as not done
            info = {}
        if info.get("fingerprint") == fingerprint:
            return bool(info.get("complete")) and (stage_dir / "model.safetensors").is_file()
        echo(f"{stage_dir.name}: recipe changed since the last run; redoing this stage")
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "complete": False}))
    return False


def _finish_stage(stage_dir: Path, fingerprint: str, model: nn.Module) -> None:
    save_model_atomic(model, stage_dir / "model.safetensors")
    atomic_write_text(stage_dir / "stage.json",
                      json.dumps({"fingerprint": fingerprint, "complete": True}))
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # the model file supersedes


def _fit(
    model: nn.Module, teacher: Teacher | None, method: Method, splits: DataSplits,
    cfg: TrainConfig, seed: int, stage_dir: Path, echo: Echo, where: str,
    teacher_model: nn.Module | None = None, tensorboard: bool = False,
) -> None:
    """Train `model` with `method` through the one engine, checkpointing into `stage_dir`."""
    loader = build_train_loader(splits, cfg, seed=seed, where=where)
    # Adapters (and per-sample buffers) exist before the optimizer is built.
    method.setup(model, teacher_model, splits.train_x[:2], num_samples=len(splits.train_x))
    optimizer = build_optimizer([*model.parameters(), *method.optimizer_parameters()],
                                cfg.optimizer)

    def evaluate() -> dict[str, float]:
        if splits.task == "embedding":  # held-out "labels": the teacher's embeddings
            return embedding_scores(model, splits.val_x, splits.val_y, batch_size=cfg.batch_size)
        if splits.task in TOKEN_TASKS:  # teacher-forced per-token figures
            scores = lm_scores(model, splits.val_x, splits.val_y, batch_size=cfg.batch_size)
            return {k: scores[k] for k in ("perplexity", "accuracy", "nll")}
        scores = classification_scores(predict(model, splits.val_x), splits.val_y)
        return {"accuracy": scores["accuracy"], "nll": scores["nll"]}

    tb_dir = stage_dir / "tensorboard" if tensorboard else None  # opened on first log: rank 0
    with MetricsLogger(stage_dir / "metrics.jsonl", tensorboard_dir=tb_dir) as logger:
        train(model, teacher, method, loader, optimizer, cfg, seed=seed, evaluate=evaluate,
              logger=logger, checkpoint_dir=stage_dir / "checkpoints", progress_bar=True,
              echo=lambda line: echo(f"  {stage_dir.parent.name}/{stage_dir.name} {line}"))


def _teacher_stage(cfg: RunConfig, tcfg_all: TeacherConfig, splits: DataSplits, run_dir: Path,
                   role: str, where: str, echo: Echo) -> nn.Module:
    stage_dir = run_dir / role
    tcfg = tcfg_all.train
    # splits.fingerprint: the data's content, not only its recipe (a regenerated JSONL file,
    # another tokenizer version or Python's own docstrings change the tokens, not the text).
    fingerprint = _fingerprint(
        cfg.data.model_dump(), splits.fingerprint, tcfg_all.model.model_dump(),
        _file_hash(tcfg_all.model.weights),
        None if tcfg is None else [_training(tcfg), tcfg.seeds[0]],
    )
    if tcfg is not None:
        torch.manual_seed(tcfg.seeds[0])  # the teacher's initial weights
    model = build_network(tcfg_all.model, splits, where=f"{where}.model")
    if distributed.on_main(lambda: _stage_done(stage_dir, fingerprint, echo)):
        load_weights(model, stage_dir / "model.safetensors")
        echo(f"{role}: done earlier, loaded")
    elif tcfg is None:
        echo(f"{role}: using the model as loaded ({where}.train is null)")
        distributed.on_main(lambda: _finish_stage(stage_dir, fingerprint, model))
    else:
        echo(f"{role}: training {tcfg_all.model.arch} for {tcfg.epochs} epoch(s)")
        _fit(model, None, build_method(CEConfig()), splits, tcfg, tcfg.seeds[0], stage_dir,
             echo, f"{where}.train", tensorboard=cfg.logging.tensorboard)
        distributed.on_main(lambda: _finish_stage(stage_dir, fingerprint, model))
    return freeze_teacher(model)


def _teacher_source(cfg: RunConfig, splits: DataSplits, model: nn.Module, cache_dir: Path,
                    echo: Echo, weights_print: str) -> Teacher | None:
    """The cache (logits, and the teacher layers the method reads) when inputs are deterministic
    and caching is on and fits `cache.max_mb`; else the live network."""
    method = build_method(cfg.method)
    if not method.uses_teacher:
        return None  # self-distillation: the teacher network is only evaluated beside it
    layers = tuple(method.teacher_layers)
    why = ("cache disabled" if not cfg.cache.enabled else "augmented inputs"
           if cfg.train.augment != "none" else "on-policy: the teacher scores the student's "
           "samples" if method.on_policy else None)
    if why is None and (layers or splits.task in TOKEN_TASKS):
        # Causal LMs and seq2seq decoders: one logit vector per label token, (T, V) per
        # sample (or its top k); a sentence encoder: its embedding.
        logits_shape: int | tuple[int, ...] = (
            (*splits.train_y.shape[1:], splits.num_classes) if splits.task in TOKEN_TASKS
            else tuple(predict(model, splits.train_x[:1]).shape[1:])
            if splits.task == "embedding" else splits.num_classes)
        size = cache_bytes(len(splits.train_x), logits_shape,
                           feature_shapes(model, splits.train_x, layers), cfg.cache.dtype,
                           topk=cfg.cache.topk)
        if size > cfg.cache.max_mb * 2**20:
            what = "teacher logits" + (" and the layers the method reads" if layers else "")
            why = (f"the {what} would make a {size / 2**20:.0f} MB cache, over "
                   f"cache.max_mb={cfg.cache.max_mb:g}")
    if why is not None:
        echo(f"cache: teacher runs online ({why})")
        return OnlineTeacher(model)
    key = CacheKey(teacher=weights_print, data=splits.fingerprint,
                   dtype=cfg.cache.dtype, layers=layers, topk=cfg.cache.topk)
    directory = cache_dir

    def ensure_cache() -> None:  # rank 0 writes the cache; the others then open it
        if TeacherCache.is_valid(directory, key):
            echo("cache: valid teacher cache found")
            return
        if (directory / "manifest.json").is_file():
            echo("cache: stale teacher cache (teacher, data, dtype, layers or k changed); "
                 "rebuilding")
        what = "logits" if cfg.cache.topk is None else f"top-{cfg.cache.topk} log-probabilities"
        what += f" and {', '.join(layers)}" if layers else ""
        echo(f"cache: running the teacher once over {len(splits.train_x)} training samples "
             f"({what})")
        build_cache(directory, model, splits.train_x, key, batch_size=cfg.cache.batch_size)

    distributed.on_main(ensure_cache)
    return CachedTeacher(TeacherCache(directory))


def _student_stage(
    role: str, cfg: RunConfig, splits: DataSplits, seed: int, run_dir: Path,
    teacher: Teacher | None, echo: Echo, teacher_models: list[nn.Module] | None = None,
    teacher_prints: list[str] | None = None,
) -> nn.Module:
    method = build_method(CEConfig() if role == "baseline" else cfg.method)
    parts: list[Any] = [cfg.data.model_dump(), splits.fingerprint, cfg.student.model.model_dump(),
                        _file_hash(cfg.student.model.weights), _training(cfg.train), seed,
                        method.cfg.model_dump(mode="json")]
    if role != "baseline" and teacher_models:
        # The teachers' actual weights, not their recipe text, and how outputs are stored.
        stored: Any = "online"
        if isinstance(teacher, CachedTeacher | EnsembleTeacher):
            stored = cfg.cache.dtype if cfg.cache.topk is None else [cfg.cache.dtype,
                                                                      cfg.cache.topk]
        parts += [teacher_prints, stored]
    stage_dir = run_dir / f"seed-{seed}" / role
    fingerprint = _fingerprint(*parts)
    torch.manual_seed(seed)  # same initial weights for baseline and student of one seed
    model = build_network(cfg.student.model, splits, where="student.model")
    if distributed.on_main(lambda: _stage_done(stage_dir, fingerprint, echo)):
        load_weights(model, stage_dir / "model.safetensors")
        echo(f"{role} (seed {seed}): done earlier, loaded")
        return model
    echo(f"{role} (seed {seed}): training with method '{method.cfg.name}'")
    _fit(model, teacher, method, splits, cfg.train, seed, stage_dir, echo, "train",
         teacher_model=teacher_models[0] if teacher_models else None,
         tensorboard=cfg.logging.tensorboard)
    distributed.on_main(lambda: method.save_artifacts(stage_dir))  # e.g. generated samples
    distributed.on_main(lambda: _finish_stage(stage_dir, fingerprint, model))
    return model


def _finetune_stage(role: str, encoder: nn.Module, cfg: RunConfig, task: DataSplits, seed: int,
                    run_dir: Path, echo: Echo) -> EncoderWithHead:
    """General distillation: a copy of `encoder` + a new linear head trained with CE on the
    transfer task (`transfer.finetune`), as a fingerprinted, resumable stage."""
    assert cfg.transfer is not None and cfg.transfer.finetune is not None
    ft = cfg.transfer.finetune
    stage_dir = run_dir / f"seed-{seed}" / f"finetune-{role}"
    fingerprint = _fingerprint(fingerprint_model(encoder), task.fingerprint, _training(ft), seed,
                               cfg.transfer.model_dump(mode="json"))
    torch.manual_seed(seed)  # the head's initial weights: the same for every encoder of a seed
    model = with_head(copy.deepcopy(encoder), task.num_classes, task.train_x,
                      dropout=cfg.transfer.dropout)
    if distributed.on_main(lambda: _stage_done(stage_dir, fingerprint, echo)):
        load_weights(model, stage_dir / "model.safetensors")
        echo(f"finetune-{role} (seed {seed}): done earlier, loaded")
        return model
    echo(f"finetune-{role} (seed {seed}): {ft.epochs} epoch(s) with a new head on '{task.name}'")
    _fit(model, None, build_method(CEConfig()), task, ft, seed, stage_dir, echo,
         "transfer.finetune", tensorboard=cfg.logging.tensorboard)
    distributed.on_main(lambda: _finish_stage(stage_dir, fingerprint, model))
    return model


def _initial_student(cfg: RunConfig, splits: DataSplits, seed: int) -> nn.Module:
    """The student exactly as `_student_stage` initialises it for `seed`."""
    torch.manual_seed(seed)
    return build_network(cfg.student.model, splits, where="student.model")


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
    check_task(build_method(cfg.method), splits)  # e.g. kd on text: say so before training
    if cfg.compress and (splits.task != "classification" or distributed.info().enabled):
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
        _teacher_stage(cfg, tcfg, splits, run_dir, role, where, echo)
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
        splits, teacher_model, run_dir / "cache" / "method", echo))
    sources = [_teacher_source(cfg, kd_splits, m, run_dir / "cache" / role, echo, fp)
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
                _student_stage("baseline", cfg, splits, seed, run_dir, None, echo))
        source, source_models, source_prints = teacher, teacher_models, teacher_prints
        for role in roles:  # born-again: each generation teaches the next (arXiv:1805.04770)
            before = source.forwards if source is not None else 0
            model = _student_stage(role, cfg, kd_splits, seed, run_dir, source, echo,
                                   source_models, source_prints)
            models[role].append(model)
            # Sources are shared across seeds and count cumulatively: add this stage's calls.
            forwards += (source.forwards - before) if source is not None else 0
            if role != roles[-1]:
                source_models = [freeze_teacher(copy.deepcopy(model))]
                source_prints = [fingerprint_model(source_models[0])]
                source = _teacher_source(cfg, kd_splits, source_models[0],
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
                return _finetune_stage(role, model, cfg, task, seed, run_dir, echo)
        rows = evaluate_encoders(
            splits=splits, task=task, transfer=cfg.transfer, eval_cfg=cfg.eval,
            teacher=teacher_model, teacher_weights=run_dir / "teacher" / "model.safetensors",
            students=models["student"], seeds=cfg.train.seeds,
            student_weights=lambda seed: run_dir / f"seed-{seed}" / "student" / "model.safetensors",
            untrained=lambda seed: _initial_student(cfg, splits, seed), finetune=finetune,
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
