"""`plan(cfg)`: the run's memory, stage by stage, before it runs.

What is measured here, in this process, as the run would do it: the process itself (the
interpreter and libraries, after a warm-up step that imports what the first optimiser step
imports), the data (`build_data`: what it leaves resident and its peak while loading), each
model (`build_network`: its weights, what the loader keeps besides them, e.g. a pretrained
state dict cached for the student's initialisation, and the peak while building), and one
training micro-step and one evaluation forward of each model at two small batches
(`kdistill.planning.steps`). What is computed: gradients (every trainable parameter's size),
optimiser state (Adam/AdamW two copies, SGD with momentum one), the cache on disk
(`kdistill.cache_size.cache_bytes`), and the batch sizes each phase runs at, to which the probes'
lines are extrapolated. `kdistill.planning.stages` composes the stages from these parts.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kdistill import devices
from kdistill.build import add_unlabelled, build_data, build_network
from kdistill.cache import build_cache
from kdistill.cache_size import cache_bytes, feature_shapes
from kdistill.config import ModelSpec, RunConfig, TrainSettings
from kdistill.methods import Method, build_method
from kdistill.methods.ce import CEConfig
from kdistill.planning.memory import MemoryPlan, capacity
from kdistill.planning.probe import Growth, heap_bytes, measure_growth, rss
from kdistill.planning.steps import (
    Forward,
    StepProbe,
    model_bytes,
    probe_forward,
    probe_step,
    teacher_source,
)
from kdistill.tasks import Task, task_of
from kdistill.teachers import freeze_teacher
from kdistill.types import DataSplits

# Drawing the report's figures once matplotlib is imported (the import itself is measured
# here): the growth of the resident set over `kdistill.report.html.write_html_report` for the
# default recipe's run, on the reference machine (docs/memory.md).
REPORT_DRAWING = 8 * 2**20


@dataclass
class Built:
    """One network as the run builds it, and its probes."""

    role: str
    module: nn.Module
    weights: int  # parameters and buffers
    weights_heap: int  # of which in malloc's heap (tensors under 32 MiB)
    growth: Growth  # what building it added to the process (resident, peak)
    forward: Forward | None = None  # evaluation forward, no captured layers
    cache_forward: Forward | None = None  # the cache build's forward (teacher layers kept)
    train: TrainSettings | None = None  # a teacher trained from the data
    step: StepProbe | None = None  # its training step (trained teachers)
    validation: int = 0  # rows of its validation's largest batch while it trains

    @property
    def kept(self) -> int:
        """Resident besides its weights: a loader's cached copy, mapped weight files."""
        return max(0, self.growth.resident - self.weights)

    @property
    def build_peak(self) -> int:
        return max(0, self.growth.peak - self.growth.resident)


@dataclass
class Probed:
    """Everything `kdistill.planning.stages` composes the plan from."""

    cfg: RunConfig
    device: torch.device
    precision: str
    splits: DataSplits
    task: Task
    runtime: int  # the process as `plan` found it (interpreter, torch, kdistill)
    optimiser_modules: int  # what the first optimiser step imports
    code: int  # library code pages the probes touched (the run's kernels)
    report_libraries: int
    data: Growth
    teachers: list[Built]
    student: Built
    online: list[bool]  # per teacher: runs online during distillation
    cache_size: list[int]  # per teacher: the cache's bytes on disk (0 when online)
    cache_step: int  # samples per teacher batch while building the cache
    baseline_step: StepProbe | None
    student_step: StepProbe | None
    method: Method
    notes: list[str] = field(default_factory=list)


def _first_optimiser_step() -> int:
    """What the run's first optimiser step loads: one Adam step on a 2-weight model imports
    torch's compiler modules (about 90 MB); measured, then resident from the first training
    stage on."""
    with measure_growth() as growth:
        model = nn.Linear(2, 1)
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    return max(0, growth[0].resident)


def _plotting_libraries() -> int:
    """What the report's plotting libraries add: their import (measured now, unless a library
    loaded them already) and drawing the figures."""
    with measure_growth() as growth:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    return growth[0].resident + REPORT_DRAWING


def _build(spec: ModelSpec, splits: DataSplits, where: str, role: str, seed: int) -> Built:
    torch.manual_seed(seed)
    with measure_growth() as growth:
        module = build_network(spec, splits, where=where)
    tensors = [*module.parameters(), *module.buffers()]
    return Built(role, module, model_bytes(module), heap_bytes(tensors), growth[0])


def _teachers(cfg: RunConfig, splits: DataSplits) -> list[Built]:
    configs = [("teacher", "teacher", cfg.teacher)]
    configs += [(f"teacher-{k + 2}", f"more_teachers.{k}", t)
                for k, t in enumerate(cfg.more_teachers)]
    built = []
    for role, where, tcfg in configs:
        seed = tcfg.train.seed if tcfg.train is not None else 0
        b = _build(tcfg.model, splits, f"{where}.model", role, seed)
        b.train = tcfg.train
        built.append(b)
    return built


def cache_layout(cfg: RunConfig, method: Method, splits: DataSplits, model: nn.Module
                 ) -> tuple[bool, int, int]:
    """(online, cache bytes, samples per cache batch) for one teacher, decided as
    `kdistill.pipeline.teaching` decides (cache disabled, augmented inputs (the recipe's or the
    data source's), an on-policy method or a cache over cache.max_mb: online) and batched as
    `kdistill.cache.build_cache` batches (at most cache.batch_size samples, fewer when their
    fp32 outputs, twice that for top-k, pass its max_batch_mb)."""
    task = task_of(splits)
    shape = task.output_shape(model, splits)
    layers = tuple(method.teacher_layers)
    ts = cfg.transfer_set  # a transfer set caches K rows per sample, unless taught online
    # planning may not import data/: the same count as data.transfer.num_transfer_inputs
    extra = getattr(splits, "unlabelled_x", None)
    samples = len(splits.train_x) + (0 if extra is None else len(extra))
    rows = samples * (ts.views or 1 if ts is not None else 1)
    size = cache_bytes(rows, shape, feature_shapes(model, splits.train_x, layers),
                       cfg.cache.dtype, topk=cfg.cache.topk)
    augmented = (ts.teaching == "online" if ts is not None else cfg.train.augment != "none"
                 or getattr(splits, "augment", None) is not None)
    online = (not cfg.cache.enabled or augmented or method.on_policy
              or size > cfg.cache.max_mb * 2**20)
    max_batch_mb = inspect.signature(build_cache).parameters["max_batch_mb"].default
    per_sample = math.prod(shape) * 4 * (1 if cfg.cache.topk is None else 2)
    step = max(1, min(cfg.cache.batch_size, int(max_batch_mb * 2**20) // max(per_sample, 1)))
    return online, (0 if online else size), min(step, len(splits.train_x))


class _FirstCall(Exception):
    """Raised by the hook of `validation_batch` at the model's first call."""


def validation_batch(task: Task, model: nn.Module, splits: DataSplits, batch_size: int) -> int:
    """The rows of the first (largest) batch the task's validation feeds the model when the
    engine passes `batch_size`: its validation runs until the model is called, and stops there
    (a task may score at its own batch, e.g. `kdistill.evaluate.predict`'s default)."""
    seen: list[int] = []

    def stop(_module: nn.Module, args: tuple) -> None:
        seen.append(len(args[0]))
        raise _FirstCall

    handle = model.register_forward_pre_hook(stop)
    try:
        task.validation_scores(model, splits, batch_size=batch_size)
    except _FirstCall:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else min(batch_size, len(splits.val_x))


def evaluation_batch(task: Task, cfg: RunConfig, splits: DataSplits) -> int:
    """The largest batch of the evaluate stage, as the tasks run it: token-level tasks score
    at most train.batch_size rows at once (min of eval.batch_size and train.batch_size); the
    others score eval.batch_size rows, then time eval.throughput_batch copies of a sample."""
    if task.token_level:
        return min(cfg.eval.batch_size, cfg.train.batch_size, len(splits.test_x))
    return max(min(cfg.eval.batch_size, len(splits.test_x)), cfg.eval.throughput_batch)


def _probe_teachers(p: Probed) -> None:
    for t in p.teachers:
        if t.train is not None:
            method = build_method(CEConfig())
            t.step = probe_step(t.module, method, lambda _b: None, p.splits, [],
                                t.train.precision)
            t.validation = validation_batch(p.task, t.module, p.splits, t.train.batch_size)
        freeze_teacher(t.module)
        layers = tuple(p.method.teacher_layers)
        t.forward = probe_forward(t.module, p.splits.train_x)
        t.cache_forward = probe_forward(t.module, p.splits.train_x, layers) if layers \
            else t.forward


def _probe_students(p: Probed) -> None:
    cfg, student = p.cfg, p.student.module
    p.student.forward = probe_forward(student, p.splits.train_x)
    p.student.validation = validation_batch(p.task, student, p.splits, cfg.train.batch_size)
    if cfg.baseline:
        p.baseline_step = probe_step(student, build_method(CEConfig()), lambda _b: None,
                                     p.splits, [], p.precision)
    method = p.method
    models = [t.module for t in p.teachers]
    method.setup(student, models[0], p.splits.train_x[:2], num_samples=len(p.splits.train_x))
    if not method.uses_teacher:
        models, online = [], []
    else:
        online = p.online
    make = teacher_source(models, online, p.splits, tuple(method.teacher_layers),
                          cfg.cache.topk)
    p.student_step = probe_step(student, method, make, p.splits, models, p.precision)


def probe(cfg: RunConfig, device: torch.device, precision: str) -> Probed:
    """Build the data and the models as the run would, and probe them (no training)."""
    start = rss()
    runtime = start.rss if start is not None else 0
    optimiser_modules = _first_optimiser_step()
    plotting = _plotting_libraries()
    with measure_growth() as data:
        splits = add_unlabelled(build_data(cfg.data, transfer=cfg.transfer), cfg)
    task = task_of(splits)
    task.check_recipe(cfg)
    teachers = _teachers(cfg, splits)
    student = _build(cfg.student.model, splits, "student.model", "student", cfg.train.seeds[0])
    method = build_method(cfg.method)
    layouts = [cache_layout(cfg, method, splits, t.module) for t in teachers]
    p = Probed(cfg, device, precision, splits, task, runtime, optimiser_modules, 0, plotting,
               data[0], teachers,
               student, [o for o, _, _ in layouts], [s for _, s, _ in layouts],
               max(s for _, _, s in layouts), None, None, method)
    with measure_growth() as probes:
        _probe_teachers(p)
        _probe_students(p)
    p.code = max(0, probes[0].resident - probes[0].anon)
    if start is None:
        p.notes.append("this platform has no /proc/self/status: the process itself, the data "
                       "and the loaders' copies are not measured (0)")
    return p


def plan(cfg: RunConfig, *, device: torch.device | str | None = None,
         precision: str | None = None) -> MemoryPlan:
    """The estimated peak memory of each stage of `cfg`'s run on `device` (default: the
    recipe's train.device, resolved as the run would) at `precision` (default: the recipe's
    train.precision), and the device's capacity.

    Builds the data and the models as the run would and runs one training micro-step and one
    evaluation forward per model at two small batches; it trains nothing and writes nothing.
    Call it before the run loads anything: the process's own memory at the call is counted as
    the run's runtime part."""
    from kdistill.planning.stages import compose

    dev = devices.resolve(cfg.train.device) if device is None else (
        devices.resolve(device) if isinstance(device, str) else device)
    prec = precision if precision is not None else cfg.train.precision
    devices.check_precision(prec, dev, where="train.precision")
    probed = probe(cfg, dev, prec)
    cap, note = capacity(str(dev))
    return MemoryPlan(str(dev), prec, compose(probed), cap, note, probed.notes)
