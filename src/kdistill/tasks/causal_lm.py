"""Causal language models: ids (N, T) -> logits (N, T, V); labels (N, T) are the ids with
IGNORE_INDEX where nothing is trained (padding, prompts), shifted (position t predicts label
t + 1). `num_classes` is the vocabulary.

Evaluation: held-out perplexity, next-token accuracy, agreement with the teacher, size and
speed; full (N, T, V) logits are never kept: each batch is reduced at once.
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.devices import model_device
from kdistill.errors import ConfigError
from kdistill.evaluate import timed_forward
from kdistill.models import count_parameters
from kdistill.tasks.base import Evaluation, Task
from kdistill.types import IGNORE_INDEX, DataSplits

if TYPE_CHECKING:  # type hints only: the config imports the tasks (their checks)
    from kdistill.config import RunConfig


@torch.no_grad()
def _batches(model: nn.Module, ids: Tensor, batch_size: int):  # type: ignore[no-untyped-def]
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for start in range(0, len(ids), batch_size):
            # Reduced per batch on the model's device; only scalars come back.
            yield start, model(ids[start : start + batch_size].to(device)).float()
    finally:
        model.train(was_training)


def next_token_predictions(model: nn.Module, ids: Tensor, *, batch_size: int = 8) -> Tensor:
    """(N, T − 1) int64: the model's argmax for token t + 1 after reading tokens ≤ t."""
    return torch.cat([logits[:, :-1].argmax(-1).cpu()
                      for _, logits in _batches(model, ids, batch_size)])


def lm_scores(model: nn.Module, ids: Tensor, labels: Tensor, *, batch_size: int = 8,
              teacher_predictions: Tensor | None = None,
              token_bytes: Tensor | None = None) -> dict[str, float]:
    """nll (mean per predicted token, nats), perplexity = exp(nll), next-token accuracy and,
    with the teacher's `next_token_predictions`, agreement (same argmax as the teacher). With
    `token_bytes` (V,), the bytes each token id stands for: bits_per_byte, the summed NLL in
    bits over the bytes of the predicted text (EOS costs bits, has no bytes), which compares
    models whatever their tokenizers.

    ids, labels: (N, T); position t predicts labels[:, t + 1]; labels == -100 are skipped."""
    nll_sum, count, correct, agree, n_bytes = 0.0, 0, 0, 0, 0
    for start, logits in _batches(model, ids, batch_size):
        target = labels[start : start + len(logits), 1:].to(logits.device)
        valid = target != IGNORE_INDEX
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        nll = F.cross_entropy(flat, target.reshape(-1), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        pred = logits[:, :-1].argmax(-1)
        nll_sum += float(nll)
        count += int(valid.sum())
        correct += int(((pred == target) & valid).sum())
        if teacher_predictions is not None:
            teacher = teacher_predictions[start : start + len(logits)].to(logits.device)
            agree += int(((pred == teacher) & valid).sum())
        if token_bytes is not None:
            n_bytes += int(token_bytes[target[valid].cpu()].sum())
    # Nothing scored (every label ignored) is not a perfect score: NaN.
    nll_mean = nll_sum / count if count else math.nan
    scores = {"nll": nll_mean, "perplexity": math.exp(min(nll_mean, 700.0)),
              "accuracy": correct / count if count else math.nan, "tokens": float(count)}
    if token_bytes is not None:
        scores["bits_per_byte"] = nll_sum / math.log(2) / n_bytes if n_bytes else math.nan
    if teacher_predictions is not None:
        scores["agreement"] = agree / max(count, 1)
    return scores


@torch.no_grad()
def lm_speed(model: nn.Module, ids: Tensor, *, batch: int = 8, repeats: int = 5) -> dict[
    str, float
]:
    """Median latency (ms) of one forward over one block, and forward tokens/s at `batch`."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        one, many = ids[:1].to(device), ids[:batch].to(device)

        def timed(x: Tensor) -> float:
            return timed_forward(model, x, device)

        timed(one)
        lat = statistics.median(timed(one) for _ in range(repeats))
        big = statistics.median(timed(many) for _ in range(max(2, repeats // 2)))
    finally:
        model.train(was_training)
    return {"latency_ms": lat * 1e3, "throughput": many.numel() / big}


def lm_report(model: nn.Module, weights_path: Path, test_x: Tensor, test_y: Tensor, *,
              teacher_predictions: Tensor | None, batch_size: int, repeats: int,
              token_bytes: Tensor | None = None) -> dict[str, Any]:
    """Everything the report shows for one causal LM (throughput in tokens/s)."""
    row: dict[str, Any] = lm_scores(model, test_x, test_y, batch_size=batch_size,
                                    teacher_predictions=teacher_predictions,
                                    token_bytes=token_bytes)
    row["params"] = count_parameters(model)
    row["bytes"] = weights_path.stat().st_size
    row.update(lm_speed(model, test_x, batch=min(batch_size, len(test_x)),
                        repeats=max(3, repeats // 6)))
    return row


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: Tensor, *, new_tokens: int) -> Tensor:
    """(P, new_tokens) int64: greedy next tokens after each prompt row (P, L), one forward of
    the whole prefix per token (no KV cache: a handful of short samples for the report)."""
    was_training = model.training
    model.eval()
    try:
        ids = prompts.to(model_device(model))
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids[:, prompts.shape[1]:].cpu()
    finally:
        model.train(was_training)


def lm_samples(tokenizer_name: str | None, test_x: Tensor, test_y: Tensor,
               models: dict[str, list[nn.Module]], *, count: int, new_tokens: int) -> list[
    dict[str, str]
]:
    """Greedy continuations of the first `count` test prompts by every model (its first seed),
    decoded: what the perplexity numbers look like as text. The prompt is a row's untrained
    prefix (a chat prompt of generated data) or, for packed text, its first `new_tokens`."""
    from kdistill.models.hf import load_tokenizer

    assert tokenizer_name is not None, "LM samples need the data's tokenizer"
    tokenizer = load_tokenizer(tokenizer_name)
    prompts = []
    for ids, labels in zip(test_x[:count], test_y, strict=False):
        trained = (labels != IGNORE_INDEX).nonzero()
        start = int(trained[0]) if len(trained) and labels[0] == IGNORE_INDEX else new_tokens
        prompts.append(ids[: max(start, 1)])
    rows: list[dict[str, str]] = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True)} for p in prompts]
    for role, trained_models in models.items():
        if trained_models:
            for row, prompt in zip(rows, prompts, strict=True):
                out = greedy_continuations(trained_models[0], prompt[None],
                                           new_tokens=new_tokens)[0]
                row[role] = tokenizer.decode(out, skip_special_tokens=True)
    return rows


def check_vocabulary(cfg: RunConfig) -> None:
    """Logit-level KD on text needs one tokenizer: every pretrained causal LM in the recipe must
    use the data's. Padded embedding tables (more rows than tokens) are fine; the method
    compares the first `len(tokenizer)` logits. A teacher with another tokenizer is named
    through `arch: projected_lm`, whose `tokenizer` must then be the data's."""
    from kdistill.models.hf import load_tokenizer

    specs = [("teacher.model", cfg.teacher.model), ("student.model", cfg.student.model),
             *((f"more_teachers.{i}.model", t.model) for i, t in enumerate(cfg.more_teachers))]
    if cfg.student.model.arch == "projected_lm":
        raise ConfigError("student.model.arch", "projected_lm is a teacher seen through the "
                                                "student's tokenizer; it cannot be trained")
    for where, spec in specs:
        # A pretrained LM's own tokenizer; a llama student initialised from a pretrained LM
        # inherits that LM's embedding rows, so its tokenizer must match as well.
        field, path = "path", spec.args.get("path", "smollm2")
        if spec.arch == "llama":
            field, path = "init_from", spec.args.get("init_from")
        elif spec.arch == "projected_lm":
            field, path = "tokenizer", spec.args.get("tokenizer")
        elif spec.arch != "hf_causal_lm":
            path = None
        if path is None or path == cfg.data.tokenizer:
            continue
        if load_tokenizer(path, where=f"{where}.args.{field}").get_vocab() != load_tokenizer(
                cfg.data.tokenizer).get_vocab():
            hint = ("name the data's tokenizer (data.tokenizer)" if field == "tokenizer" else
                    "use the same tokenizer, teach through arch: projected_lm (the teacher "
                    "projected onto the data's tokenizer), or sequence-level KD (train the "
                    "student on the teacher's generated text)")
            raise ConfigError(f"{where}.args.{field}" if field != "path" else where,
                              f"'{path}' uses another tokenizer than the data "
                              f"('{cfg.data.tokenizer}'): token-level KD compares "
                              f"distributions over one vocabulary; {hint}")


@functools.lru_cache(maxsize=4)
def _token_bytes(tokenizer_name: str) -> Tensor | None:
    from kdistill.models.cross_tokenizer import token_byte_lengths
    from kdistill.models.hf import load_tokenizer

    return token_byte_lengths(load_tokenizer(tokenizer_name))


def _eval_batch(ev: Evaluation) -> int:
    # (B, T, V) logits of a large vocabulary: never more rows than the training batch.
    return min(ev.cfg.eval.batch_size, ev.cfg.train.batch_size)


class CausalLM(Task):
    name: ClassVar[str] = "causal_lm"
    title: ClassVar[str] = "text (causal LM)"
    token_level: ClassVar[bool] = True

    def describe(self, splits: DataSplits) -> str:
        return (f"{splits.name}: {splits.train_x.numel():,} train / {splits.val_x.numel():,} "
                f"val / {splits.test_x.numel():,} test tokens in blocks of "
                f"{splits.input_shape[0]}, vocabulary {splits.num_classes:,}")

    def check_outputs(self, out: Any, splits: DataSplits, *, where: str) -> None:
        if not isinstance(out, Tensor) or out.dim() != 3:
            raise ConfigError(where, f"a {self.name} model must return logits of shape "
                                     "(batch, tokens, vocabulary)")
        if out.shape[-1] < splits.num_classes:
            raise ConfigError(where, f"outputs {out.shape[-1]} vocabulary entries but the "
                                     f"tokenizer has {splits.num_classes}")

    def check_recipe(self, cfg: RunConfig) -> None:
        check_vocabulary(cfg)

    def output_shape(self, teacher: nn.Module, splits: DataSplits) -> tuple[int, ...]:
        return (*splits.train_y.shape[1:], splits.num_classes)  # one logit vector per label

    def validation_scores(self, model: nn.Module, splits: DataSplits, *,
                          batch_size: int) -> dict[str, float]:
        scores = lm_scores(model, splits.val_x, splits.val_y, batch_size=batch_size)
        return {k: scores[k] for k in ("perplexity", "accuracy", "nll")}

    def at_chance(self, row: dict[str, Any], splits: DataSplits) -> str | None:
        # A uniform guess over the vocabulary has perplexity V.
        perplexity = row.get("perplexity")
        vocab = int(row.get("vocabulary", splits.num_classes))  # a projected teacher's own
        if isinstance(perplexity, float) and perplexity >= 0.5 * vocab:
            return (f"test perplexity {perplexity:,.0f}, near a uniform guess over the "
                    f"{vocab:,} tokens of the vocabulary")
        return None

    def reference(self, teacher: nn.Module, ev: Evaluation) -> Tensor | None:
        from kdistill.models.cross_tokenizer import ProjectedLM

        if isinstance(teacher, ProjectedLM):  # its targets read the next ids: no agreement
            return None
        # The teacher's next-token argmax, not (N, T, V) logits.
        return next_token_predictions(teacher, ev.splits.test_x, batch_size=_eval_batch(ev))

    def test_row(self, model: nn.Module, weights: Path, reference: Tensor | None,
                 ev: Evaluation) -> tuple[dict[str, Any], Any]:
        from kdistill.models.cross_tokenizer import ProjectedLM, token_byte_lengths

        if isinstance(model, ProjectedLM):
            # Scored on its own tokenization of the same test text: perplexity per teacher
            # token, bits per byte comparable with the students'.
            ids, labels = model.projection.teacher_blocks(ev.splits.test_x)
            row = lm_report(model.teacher, weights, ids, labels, teacher_predictions=None,
                            batch_size=_eval_batch(ev), repeats=ev.cfg.eval.latency_repeats,
                            token_bytes=token_byte_lengths(model.projection.teacher_tok))
            row["vocabulary"] = len(model.projection.teacher_bytes)  # perplexity per its token
            return row, None
        name = getattr(ev.cfg.data, "tokenizer", None)
        row = lm_report(model, weights, ev.splits.test_x, ev.splits.test_y,
                        teacher_predictions=reference, batch_size=_eval_batch(ev),
                        repeats=ev.cfg.eval.latency_repeats,
                        token_bytes=None if name is None else _token_bytes(name))
        return row, None

    def samples(self, ev: Evaluation, produced: dict[str, Any]) -> list[dict[str, str]]:
        e = ev.cfg.eval
        if not e.samples:
            return []
        return lm_samples(getattr(ev.cfg.data, "tokenizer", None), ev.splits.test_x,
                          ev.splits.test_y, ev.models, count=e.samples, new_tokens=e.sample_tokens)
