"""The only place where a config becomes objects: data, models, loaders, optimisers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from kdistill.capture import resolve_modules, split_name
from kdistill.config import ModelSpec, OptimizerConfig, RunConfig, TrainSettings, TransferConfig
from kdistill.data import DataSplits, LoadContext, Source
from kdistill.data.fortune_classes import fortune_splits
from kdistill.data.general_text import EMBEDDING, held_out_texts
from kdistill.data.loader import BatchLoader, jitter
from kdistill.errors import ConfigError
from kdistill.logger import require_tensorboard
from kdistill.methods import Method, build_method
from kdistill.models import build_model


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


def build_transfer_data(cfg: RunConfig) -> DataSplits | None:
    """The labelled task that evaluates a general encoder (`transfer`), tokenised like the
    unlabelled text; None without `transfer`."""
    if cfg.transfer is None:
        return None
    from kdistill.models.hf import load_tokenizer

    t, data = cfg.transfer, cfg.data
    return fortune_splits(t.task, load_tokenizer(data.tokenizer), seq_len=data.seq_len,
                          val_size=t.val_size, test_size=t.test_size,
                          split_seed=data.split_seed, where="transfer")


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
    if splits.task in ("causal_lm", "seq2seq"):
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            raise ConfigError(where, f"a {splits.task} model must return logits of shape "
                                     "(batch, tokens, vocabulary)")
        if out.shape[-1] < splits.num_classes:
            raise ConfigError(where, f"outputs {out.shape[-1]} vocabulary entries but the "
                                     f"tokenizer has {splits.num_classes}")
        return
    if splits.task == EMBEDDING:  # no classes: any width (the method projects the student's)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or not out.is_floating_point():
            raise ConfigError(where, "a sentence encoder must return embeddings of shape "
                                     "(batch, width), e.g. arch: hf_sentence_student")
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(where, "the model must return logits of shape (batch, classes)")
    if out.shape[1] != splits.num_classes:
        raise ConfigError(
            where,
            f"outputs {out.shape[1]} classes but data '{splits.name}' has {splits.num_classes}",
        )


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_train_loader(
    splits: DataSplits, cfg: TrainSettings, *, seed: int, where: str
) -> BatchLoader:
    augment = None
    if cfg.augment == "jitter":
        if len(splits.input_shape) != 3:
            raise ConfigError(f"{where}.augment", f"jitter needs images; '{splits.name}' "
                                                  f"inputs have shape {splits.input_shape}")
        augment = jitter(cfg.jitter_pixels)
    return BatchLoader(splits.train_x, splits.train_y, batch_size=cfg.batch_size, shuffle=True,
                       seed=seed, augment=augment)


def check_vocabulary(cfg: RunConfig) -> None:
    """Logit-level KD on text needs one tokenizer: every pretrained causal LM in the recipe must
    use the data's. Padded embedding tables (more rows than tokens) are fine; the method
    compares the first `len(tokenizer)` logits."""
    if cfg.data.task != "causal_lm":
        return
    from kdistill.models.hf import load_tokenizer

    specs = [("teacher.model", cfg.teacher.model), ("student.model", cfg.student.model),
             *((f"more_teachers.{i}.model", t.model) for i, t in enumerate(cfg.more_teachers))]
    for where, spec in specs:
        # A pretrained LM's own tokenizer; a llama student initialised from a pretrained LM
        # inherits that LM's embedding rows, so its tokenizer must match as well.
        field, path = "path", spec.args.get("path", "smollm2")
        if spec.arch == "llama":
            field, path = "init_from", spec.args.get("init_from")
        elif spec.arch != "hf_causal_lm":
            path = None
        if path is None or path == cfg.data.tokenizer:
            continue
        if load_tokenizer(path, where=f"{where}.args.{field}").get_vocab() != load_tokenizer(
                cfg.data.tokenizer).get_vocab():
            raise ConfigError(f"{where}.args.{field}" if field == "init_from" else where,
                              f"'{path}' uses another tokenizer than the data "
                                     f"('{cfg.data.tokenizer}'): token-level KD compares "
                                     f"distributions over one vocabulary. Use the same "
                                     f"tokenizer, or sequence-level KD (train the student on "
                                     f"the teacher's generated text), which needs none")


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


def validate(cfg: RunConfig) -> DataSplits:
    """Build data and both networks without training (what `kdistill validate` runs)."""
    if cfg.logging.tensorboard:
        require_tensorboard()  # a missing optional sink is reported before any real work
    splits = build_data(cfg.data, transfer=cfg.transfer)
    build_transfer_data(cfg)  # the evaluation task's split must exist too
    check_vocabulary(cfg)  # before loading any model: the clearer error
    teacher = build_network(cfg.teacher.model, splits, where="teacher.model")
    student = build_network(cfg.student.model, splits, where="student.model")
    method = build_method(cfg.method)
    for side, model, names in (("student", student, method.student_layers),
                               ("teacher", teacher, method.teacher_layers)):
        for name in names:
            resolve_modules(model, [name], where=_layer_field(method, side, name))
    # Adapters: shapes must be compatible.
    method.setup(student, teacher, splits.train_x[:2], num_samples=len(splits.train_x))
    for where, train_cfg in (("train", cfg.train), ("teacher.train", cfg.teacher.train)):
        if train_cfg is not None:
            build_train_loader(splits, train_cfg, seed=0, where=where)
    return splits
