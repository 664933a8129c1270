"""Evaluation: task quality, agreement with the teacher, calibration, size and speed."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.devices import model_device
from kdistill.models import count_parameters


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Outputs (N, ...) in eval mode, float32 on the CPU; inputs go to the model's device a
    batch at a time. Restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        chunks = [model(x[i : i + batch_size].to(device)).float().cpu()
                  for i in range(0, len(x), batch_size)]
        return torch.cat(chunks)
    finally:
        model.train(was_training)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_forward(model: nn.Module, x: Tensor, device: torch.device) -> float:
    """Seconds of one forward of `x`, queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    model(x)
    synchronize(device)
    return time.perf_counter() - start


def expected_calibration_error(probs: Tensor, labels: Tensor, *, bins: int = 15) -> float:
    """ECE (Guo et al. 2017, arXiv:1706.04599): |accuracy − confidence| over equal-width bins,
    weighted by the share of samples in each bin. probs (N, C), labels (N,)."""
    confidence, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            ece += gap * in_bin.float().mean()
    return float(ece)


def classification_scores(
    logits: Tensor, labels: Tensor, *, teacher_logits: Tensor | None = None, ece_bins: int = 15
) -> dict[str, float]:
    """accuracy, errors, nll, ece, and agreement (same argmax as the teacher) when given."""
    probs = logits.softmax(dim=1)
    pred = logits.argmax(dim=1)
    scores = {
        "accuracy": float((pred == labels).float().mean()),
        "errors": float((pred != labels).sum()),
        "nll": float(torch.nn.functional.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(probs, labels, bins=ece_bins),
    }
    if teacher_logits is not None:
        scores["agreement"] = float((pred == teacher_logits.argmax(dim=1)).float().mean())
    return scores


def per_class_accuracy(logits: Tensor, labels: Tensor) -> list[float | None]:
    """Accuracy on the test samples of each class, logits (N, C) and labels (N,).

    None for a class with no test sample: JSON has no NaN, and 0.0 would read as a failure.
    """
    pred = logits.argmax(dim=1)
    out: list[float | None] = []
    for c in range(logits.shape[1]):
        mask = labels == c
        out.append(float((pred[mask] == c).float().mean()) if mask.any() else None)
    return out


@torch.no_grad()
def measure_speed(
    model: nn.Module, example: Tensor, *, throughput_batch: int = 256, repeats: int = 30
) -> dict[str, float]:
    """Median latency (ms) at batch 1 and median throughput (samples/s) at `throughput_batch`.

    Each measurement is repeated `repeats` times after warm-up; the median resists the stalls
    that 2-vCPU virtual machines show. Run with the same thread count for every model compared.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        one = example[:1].to(device)
        many = one.expand(throughput_batch, *example.shape[1:]).contiguous()

        def timed(x: Tensor) -> float:
            return timed_forward(model, x, device)

        for _ in range(3):
            timed(one)
            timed(many)
        lat = statistics.median(timed(one) for _ in range(repeats))
        big = statistics.median(timed(many) for _ in range(max(3, repeats // 3)))
    finally:
        model.train(was_training)
    return {"latency_ms": lat * 1e3, "throughput": throughput_batch / big}


def model_report(
    model: nn.Module,
    weights_path: Path,
    test_x: Tensor,
    test_y: Tensor,
    *,
    teacher_logits: Tensor | None,
    batch_size: int,
    ece_bins: int,
    throughput_batch: int,
    repeats: int,
) -> dict[str, Any]:
    """Everything the report table shows for one trained model."""
    logits = predict(model, test_x, batch_size=batch_size)
    row: dict[str, Any] = classification_scores(
        logits, test_y, teacher_logits=teacher_logits, ece_bins=ece_bins
    )
    # Per class, for the report's gap plot: where distillation helps is rarely uniform.
    row["per_class_accuracy"] = per_class_accuracy(logits, test_y)
    row["params"] = count_parameters(model)
    row["bytes"] = weights_path.stat().st_size
    row.update(measure_speed(model, test_x, throughput_batch=throughput_batch, repeats=repeats))
    return row
