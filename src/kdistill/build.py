"""The only place where a config becomes objects: data, models, loaders, optimisers."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from kdistill import devices
from kdistill.capture import resolve_modules, split_name
from kdistill.config import ModelSpec, OptimizerConfig, RunConfig, TrainSettings, TransferConfig
from kdistill.data import DataSplits, LoadContext, Source
from kdistill.data.general_text import held_out_texts
from kdistill.data.loader import BatchLoader, compose, jitter
from kdistill.data.transfer import (
    TransferLoader,
    TransferSetConfig,
    make_views,
    transfer_inputs,
)
from kdistill.data.unlabelled_texts import UnlabelledTexts
from kdistill.data.word_classes import check_word_classes
from kdistill.errors import ConfigError
from kdistill.logger import require_tensorboard
from kdistill.methods import Method, build_method
from kdistill.models import build_model
from kdistill.models.factory import CUSTOM, check_target
from kdistill.tasks import task_of


def build_data(source: Source, *, transfer: TransferConfig | None = None,
               run_dir: Path | None = None) -> DataSplits:
    """The recipe's data (`data:`); general distillation also drops the held-out texts of the
    task that evaluates the encoder (`transfer`), so they are never trained on."""
    exclude: frozenset[str] = frozenset()
    if transfer is not None:
        exclude = frozenset(held_out_texts(transfer.task, val_size=transfer.val_size,
                                           test_size=transfer.test_size,
                                           split_seed=getattr(source, "split_seed", 0)))
    return source.load(LoadContext(where="data", exclude_texts=exclude, run_dir=run_dir))


def add_unlabelled(splits: DataSplits, cfg: RunConfig) -> DataSplits:
    """The data with `transfer_set.unlabelled`'s inputs attached (`unlabelled_x`): every split
    of that source, less the inputs equal to one of the data's own (a validation or test
    input must never be trained on) and repeats."""
    ts = cfg.transfer_set
    if ts is None or ts.unlabelled is None:
        return splits
    where = "transfer_set.unlabelled"
    other = ts.unlabelled.load(LoadContext(where=where))
    parts = (other.train_x, other.val_x, other.test_x, splits.train_x, splits.val_x,
             splits.test_x)
    if not all(isinstance(p, torch.Tensor) for p in parts):
        raise ConfigError(where, "inputs decoded from files on demand (an image folder) cannot "
                          "be compared with the data's held-out inputs; use in-memory sources")
    x = torch.cat([other.train_x, other.val_x, other.test_x])
    _check_same_inputs(x, other, splits, where)
    if getattr(cfg.data, "text_pair", None) and isinstance(ts.unlabelled, UnlabelledTexts):
        raise ConfigError(f"{where}.name", "the data's inputs are sentence pairs "
                          "(data.text_pair); single texts would teach another task: name a "
                          "text_classification table with the same two columns instead")
    seen = {_row_key(row) for part in (splits.train_x, splits.val_x, splits.test_x)
            for row in part}
    keep = []
    for i, row in enumerate(x):
        key = _row_key(row)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if not keep:
        raise ConfigError(where, f"every input of '{other.name}' is one of the data's own: "
                          "nothing to add; name another source")
    kept = x[torch.tensor(keep, dtype=torch.long)]
    note = (f"data: {len(kept):,} unlabelled inputs from '{other.name}' for the distilled "
            f"student ({len(x) - len(kept):,} dropped: equal to an input of the data or a "
            "repeat)")
    return dataclasses.replace(splits, unlabelled_x=kept, notes=(*splits.notes, note))


def _check_same_inputs(x: torch.Tensor, other: DataSplits, splits: DataSplits,
                       where: str) -> None:
    """The other source's inputs are the data's kind: same tokenizer, same length, same type."""
    texts = (other.tokens is not None, splits.tokens is not None)
    if all(texts) and other.tokens != splits.tokens:
        raise ConfigError(f"{where}.tokenizer", f"'{other.name}' is tokenised differently from "
                          "the data: use the data's tokenizer")
    if texts[0] != texts[1] or x.shape[1:] != splits.train_x.shape[1:] or (
            x.dtype != splits.train_x.dtype):
        field = f"{where}.seq_len" if all(texts) else where
        raise ConfigError(field, f"'{other.name}' inputs are {tuple(x.shape[1:])} {x.dtype}, "
                          f"the data's {tuple(splits.train_x.shape[1:])} "
                          f"{splits.train_x.dtype}: use the data's input size")


def _row_key(row: torch.Tensor) -> bytes:
    # A 16-byte digest, not the row's bytes: a set over MNIST's 70 k images stays small.
    return hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest()


def build_network(spec: ModelSpec, splits: DataSplits, *, where: str) -> nn.Module:
    """Build a model for this data and check it maps one input to `num_classes` logits."""
    model = build_model(
        spec.arch, input_shape=splits.input_shape, num_classes=splits.num_classes,
        args=dict(spec.args), weights=spec.weights, target=spec.target, where=where,
    )
    check_outputs(model, splits, where=where)
    return model


@torch.no_grad()
def check_outputs(model: nn.Module, splits: DataSplits, *, where: str) -> None:
    """Run `model` on two training samples; its output must be what the data's task needs."""
    was_training = model.training
    model.eval()
    try:
        out = model(splits.train_x[:2])
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            where, f"cannot run on '{splits.name}' inputs of shape {splits.input_shape}: {first}"
        ) from None
    finally:
        model.train(was_training)
    task_of(splits).check_outputs(out, splits, where=where)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_train_loader(
    splits: DataSplits, cfg: TrainSettings, *, seed: int, where: str,
    transfer_set: TransferSetConfig | None = None, unlabelled: bool = False,
) -> BatchLoader:
    """The training batches: the training split (augmented by `cfg.augment` and the source's
    own augmentation), or, for the students of a run with `transfer_set`, its views (of the
    unlabelled inputs too, for a distilled student: `unlabelled`)."""
    if transfer_set is not None:
        return _transfer_loader(splits, cfg, seed, transfer_set, unlabelled)
    augment = None
    if cfg.augment == "jitter":
        if len(splits.input_shape) != 3:
            raise ConfigError(f"{where}.augment", f"jitter needs images; '{splits.name}' "
                                                  f"inputs have shape {splits.input_shape}")
        augment = jitter(cfg.jitter_pixels)
    # The source's own augmentation (e.g. an image folder's random crops) after the recipe's.
    return BatchLoader(splits.train_x, splits.train_y, batch_size=cfg.batch_size, shuffle=True,
                       seed=seed, augment=compose(augment, splits.augment))


def _transfer_loader(splits: DataSplits, cfg: TrainSettings, seed: int,
                     ts: TransferSetConfig, unlabelled: bool) -> TransferLoader:
    if splits.augment is not None:
        raise ConfigError("transfer_set", f"'{splits.name}' augments its training images itself "
                          "(random_crop / random_flip); with a transfer set set those to 0 / "
                          "false and use transfer_set.jitter / flip")
    check_views(splits, ts)
    views = make_views(splits, ts, unlabelled=unlabelled)
    return TransferLoader(views, batch_size=cfg.batch_size, seed=seed)


def check_views(splits: DataSplits, ts: TransferSetConfig) -> None:
    """The views `ts` makes fit these inputs: images for jitter, flip and CutMix, padded
    text (token roles known) for masking and n-grams, real-valued inputs for mixup."""
    tokens = not splits.train_x[:1].is_floating_point()
    if tokens and (ts.needs_images or ts.mixes):
        raise ConfigError("transfer_set", f"'{splits.name}' inputs are token ids: jitter, "
                          "flip and mix need images or signals; use mask_prob / ngram_prob / "
                          "swap_prob")
    if ts.needs_tokens and (not tokens or splits.tokens is None):
        raise ConfigError("transfer_set", f"mask_prob, ngram_prob and swap_prob change padded "
                          f"text; '{splits.name}' inputs are not")
    if ts.swap_prob and splits.tokens is not None:
        check_word_classes(transfer_inputs(splits, unlabelled=True)[0], splits.tokens,
                           ts.swap_classes)
    if ts.needs_images and len(splits.input_shape) != 3:
        raise ConfigError("transfer_set", f"jitter, flip and cutmix need images (C, H, W); "
                          f"'{splits.name}' inputs have shape {splits.input_shape} (mixup "
                          "works on any input)")


def _contains(value: object, name: str) -> bool:
    if isinstance(value, str):
        return split_name(value)[0] == split_name(name)[0]  # `attn` adds an "[i]" suffix
    if isinstance(value, list | tuple):
        return any(_contains(v, name) for v in value)
    return False


def _layer_field(method: Method, side: str, name: str) -> str:
    """The recipe field that names layer `name` of the `side` network (`method.student_layer`,
    `method.pairs`), so an unknown layer's error points at what to edit."""
    fields = [(key, value) for key, value in method.cfg if _contains(value, name)]
    fields.sort(key=lambda kv: not kv[0].startswith(side))  # student_layer before teacher_layer
    return f"method.{fields[0][0]}" if fields else f"method ({side} layers)"


def check_devices(cfg: RunConfig) -> None:
    """Every device and precision the recipe names fits this machine (a GPU named where there
    is none, fp16 on the CPU): checked before anything trains, each error naming its field."""
    train = cfg.train.device
    sections: list[tuple[str, TrainSettings | None, str | None]] = [
        ("train", cfg.train, None),
        ("teacher.train", cfg.teacher.train, cfg.teacher.device or train),
        *((f"more_teachers.{i}.train", t.train, t.device or train)
          for i, t in enumerate(cfg.more_teachers)),
        ("transfer.finetune", cfg.transfer.finetune if cfg.transfer else None, train)]
    for where, teacher in [("teacher", cfg.teacher),
                           *((f"more_teachers.{i}", t) for i, t in enumerate(cfg.more_teachers))]:
        devices.resolve(teacher.device or train, where=f"{where}.device")
        if teacher.device and cfg.train.strategy == "fsdp":
            raise ConfigError(f"{where}.device", "with train.strategy: fsdp the teacher is "
                              "sharded over the training devices; remove teacher.device")
    for where, settings, fallback in sections:
        if settings is not None:
            device = devices.resolve(settings.device or fallback or train,
                                     where=f"{where}.device")
            devices.check_precision(settings.precision, device, where=f"{where}.precision")


def validate(cfg: RunConfig, *, build_custom: bool = False) -> DataSplits:
    """Build data and both networks without training (what `kdistill validate` runs).

    A model of `arch: custom` is the user's code: without `build_custom` (`validate --build`)
    its target is only checked (imported and inspected, never called), and the checks that
    need the built networks (layer names, adapter shapes) are left to the run."""
    if cfg.logging.tensorboard:
        require_tensorboard()  # a missing optional sink is reported before any real work
    check_devices(cfg)
    splits = add_unlabelled(build_data(cfg.data, transfer=cfg.transfer), cfg)
    task_of(splits).check_recipe(cfg)  # e.g. tokenizers, before loading any model
    specs = [("teacher.model", cfg.teacher.model), ("student.model", cfg.student.model),
             *((f"more_teachers.{i}.model", t.model) for i, t in enumerate(cfg.more_teachers))]
    custom = [(where, spec) for where, spec in specs if spec.arch == CUSTOM]
    if custom and not build_custom:
        for where, spec in custom:
            check_target(spec.target, where)
        _check_loaders(cfg, splits)
        return splits
    teacher = build_network(cfg.teacher.model, splits, where="teacher.model")
    student = build_network(cfg.student.model, splits, where="student.model")
    method = build_method(cfg.method)
    for side, model, names in (("student", student, method.student_layers),
                               ("teacher", teacher, method.teacher_layers)):
        for name in names:
            resolve_modules(model, [name], where=_layer_field(method, side, name))
    # Adapters: shapes must be compatible.
    method.setup(student, teacher, splits.train_x[:2], num_samples=len(splits.train_x))
    _check_loaders(cfg, splits)
    return splits


def _check_loaders(cfg: RunConfig, splits: DataSplits) -> None:
    for where, train_cfg in (("train", cfg.train), ("teacher.train", cfg.teacher.train)):
        if train_cfg is not None:
            build_train_loader(splits, train_cfg, seed=0, where=where,
                               transfer_set=cfg.transfer_set if where == "train" else None)
