"""The only place where a config becomes objects: data, models, loaders, optimisers."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from torch import nn

from kdistill.capture import resolve_modules, split_name
from kdistill.config import (
    DataConfig,
    ModelSpec,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
    TransferConfig,
)
from kdistill.data import DATASETS, DataSplits, load_dataset
from kdistill.data.fortune_classes import FORTUNE_TASKS, fortune_splits
from kdistill.data.general_text import EMBEDDING, GENERAL_TEXT, general_splits, held_out_texts
from kdistill.data.loader import BatchLoader, jitter
from kdistill.data.sft import sft_splits
from kdistill.data.text import CORPORA, lm_splits
from kdistill.data.translation import LANGUAGES as TRANSLATION
from kdistill.data.translation import translation_splits
from kdistill.errors import ConfigError
from kdistill.logger import require_tensorboard
from kdistill.methods import METHODS, Method, build_method
from kdistill.models import build_model

GENERATED = "generated"  # data.name of a `kdistill generate` JSONL file


def build_data(cfg: DataConfig, *, transfer: TransferConfig | None = None) -> DataSplits:
    """The recipe's data; `transfer` (general distillation) names the labelled task whose
    held-out texts must stay out of the unlabelled corpus."""
    if cfg.name in TRANSLATION:
        return _build_translation(cfg)
    if cfg.name == GENERAL_TEXT:
        return _build_general(cfg, transfer)
    if cfg.name in CORPORA or cfg.name == GENERATED:
        return _build_text(cfg)
    if cfg.name in FORTUNE_TASKS:
        return _build_text_classes(cfg)
    if cfg.name not in DATASETS:  # every kind of data a recipe can name, not only images
        known = [*DATASETS, *FORTUNE_TASKS, *CORPORA, GENERATED, *TRANSLATION]
        close = difflib.get_close_matches(cfg.name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("data.name", f"unknown data set {cfg.name!r}{hint}; expected one of: "
                                       f"{', '.join(known)}")
    if cfg.val_size >= 1 and not float(cfg.val_size).is_integer():
        raise ConfigError("data.val_size", f"a count must be a whole number, got {cfg.val_size}")
    val_size: int | float = int(cfg.val_size) if cfg.val_size >= 1 else cfg.val_size
    splits = load_dataset(
        cfg.name, val_size=val_size, split_seed=cfg.split_seed, train_limit=cfg.train_limit,
        where="data.name",
    )
    if len(splits.val_x) == 0:
        raise ConfigError("data.val_size", f"{cfg.val_size} leaves an empty validation split")
    return splits


def _build_translation(cfg: DataConfig) -> DataSplits:
    """Message pairs from the gettext catalogs, packed (N, 2, seq_len) with a joint BPE."""
    for field, value in (("tokenizer", cfg.tokenizer), ("max_train_tokens", cfg.max_train_tokens),
                         ("max_eval_tokens", cfg.max_eval_tokens), ("path", cfg.path)):
        if value is not None:  # refuse a setting that would otherwise be ignored silently
            raise ConfigError(f"data.{field}", f"not used by '{cfg.name}' (it trains its own "
                                               f"BPE: data.vocab_size; data.train_limit caps "
                                               f"the training pairs)")
    return translation_splits(cfg.name, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size,
                              val_size=cfg.val_size, test_size=cfg.test_size,
                              split_seed=cfg.split_seed, train_limit=cfg.train_limit)


def _build_text_classes(cfg: DataConfig) -> DataSplits:
    """A text-classification task: padded token ids (N, seq_len) and a category per text."""
    _text_only(cfg)
    from kdistill.models.hf import load_tokenizer

    return fortune_splits(cfg.name, load_tokenizer(cfg.tokenizer), seq_len=cfg.seq_len,
                          val_size=cfg.val_size, test_size=cfg.test_size,
                          split_seed=cfg.split_seed, train_limit=cfg.train_limit, where="data")


def _text_only(cfg: DataConfig) -> None:
    """Fixed-length texts: a tokenizer is needed, token limits of corpora would be ignored."""
    if cfg.tokenizer is None:
        raise ConfigError("data.tokenizer", f"text data '{cfg.name}' needs the tokenizer of "
                                            f"the teacher, e.g. tokenizer: minilm")
    for field, value in (("max_train_tokens", cfg.max_train_tokens),
                         ("max_eval_tokens", cfg.max_eval_tokens)):
        if value is not None:  # refuse a limit that would otherwise be ignored silently
            raise ConfigError(f"data.{field}", f"counts tokens of a text corpus; for '{cfg.name}' "
                                               f"use data.train_limit (texts)")


def _build_general(cfg: DataConfig, transfer: TransferConfig | None) -> DataSplits:
    """Unlabelled sentences (task "embedding"), without the transfer task's held-out texts."""
    _text_only(cfg)
    from kdistill.models.hf import load_tokenizer

    exclude: set[str] = set()
    if transfer is not None:
        exclude = held_out_texts(transfer.task, val_size=transfer.val_size,
                                 test_size=transfer.test_size, split_seed=cfg.split_seed)
    return general_splits(load_tokenizer(cfg.tokenizer), seq_len=cfg.seq_len,
                          val_size=cfg.val_size, test_size=cfg.test_size,
                          split_seed=cfg.split_seed, train_limit=cfg.train_limit,
                          exclude=exclude, where="data")


def build_transfer_data(cfg: RunConfig) -> DataSplits | None:
    """The labelled task that evaluates a general encoder (`transfer`), tokenised like the
    unlabelled text; None without `transfer`."""
    if cfg.transfer is None or cfg.data.tokenizer is None:
        return None
    from kdistill.models.hf import load_tokenizer

    t = cfg.transfer
    return fortune_splits(t.task, load_tokenizer(cfg.data.tokenizer), seq_len=cfg.data.seq_len,
                          val_size=t.val_size, test_size=t.test_size,
                          split_seed=cfg.data.split_seed, where="transfer")


def _build_text(cfg: DataConfig) -> DataSplits:
    """A text corpus as packed token blocks, or generated answers as prompt-masked rows."""
    if cfg.tokenizer is None:
        raise ConfigError("data.tokenizer", f"text corpus '{cfg.name}' needs the tokenizer of "
                                            f"the teacher, e.g. tokenizer: smollm2")
    # Refuse limits that would otherwise be ignored silently.
    if cfg.train_limit is not None:
        raise ConfigError("data.train_limit", "counts samples of image/signal data; for text "
                                              "use data.max_train_tokens")
    if cfg.name == GENERATED and (cfg.max_train_tokens or cfg.max_eval_tokens):
        raise ConfigError("data.max_train_tokens", "not applied to generated answers; limit "
                                                   "the prompts when generating (prompts.limit)")
    if cfg.val_size >= 1:
        raise ConfigError("data.val_size", "for a text corpus, a fraction of the documents "
                                           f"(e.g. 0.05); got {cfg.val_size}")
    from kdistill.models.hf import load_tokenizer

    if cfg.name == GENERATED:
        if cfg.path is None:
            raise ConfigError("data.path", "the JSONL file written by `kdistill generate`")
        return sft_splits(cfg.path, load_tokenizer(cfg.tokenizer), seq_len=cfg.seq_len,
                          val_fraction=cfg.val_size, test_fraction=cfg.test_size,
                          split_seed=cfg.split_seed, system=cfg.system, where="data")
    return lm_splits(cfg.name, load_tokenizer(cfg.tokenizer), seq_len=cfg.seq_len,
                     val_fraction=cfg.val_size, test_fraction=cfg.test_size,
                     split_seed=cfg.split_seed, max_train_tokens=cfg.max_train_tokens,
                     max_eval_tokens=cfg.max_eval_tokens, where="data.name")


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
    splits: DataSplits, cfg: TrainConfig, *, seed: int, where: str
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
    if cfg.data.name not in (*CORPORA, GENERATED) or cfg.data.tokenizer is None:
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


def check_task(method: Method, splits: DataSplits) -> None:
    """The method's loss must be defined for the data's task (classes vs next tokens)."""
    if splits.task not in method.tasks:
        fitting = ", ".join(sorted(n for n, m in METHODS.items() if splits.task in m.tasks))
        raise ConfigError("method", f"'{method.cfg.name}' is for {', '.join(method.tasks)} "
                                    f"data; '{splits.name}' is {splits.task} data (methods for "
                                    f"it: {fitting})")


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
    check_task(method, splits)
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
