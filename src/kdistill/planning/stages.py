"""The run's stages as phases, composed from the probed parts.

The order and what each stage holds follow `kdistill.pipeline.order`:

- prepare: the data while it loads.
- teach: each teacher built (and, with teacher.train, trained: a training step, the optimiser
  step, validation); then the student built once to check it (`teach` fails fast).
- cache: the teacher over the training set, `cache_step` samples at a time, into the
  memory-mapped cache, whose pages stay mapped while it is written.
- baseline, student: the last seed's stages (earlier seeds' models stay in memory for the
  evaluation, each with its last gradients, which the engine frees only at the next step):
  building the student, a micro-step (batch_size / grad_accum samples: activations, the
  loss's buffers, the teacher's outputs), the optimiser step, validation.
- evaluate: every model on the test set at the task's batch; the cache is still mapped.
- report: the plotting libraries on top of everything still held.

From the first training phase on, the modules that the first optimiser step imports are
resident. Gradients are counted whole in every training phase: with grad_accum > 1 they are
alive from the second micro-batch on; with 1 they grow during the backward pass, so this
overstates the peak by at most their size.

On a CPU with glibc, what was freed from malloc's heap stays resident (`HEAP_MAX` in
`kdistill.planning.probe`): every phase holds at least the largest heap any earlier phase
used, so a phase whose own heap is smaller shows the difference as "freed heap kept by
malloc" (a training step's activations of a few MB each, freed, under a later batch's large
tensors, which get their own mappings).
"""

from __future__ import annotations

import math
import sys

from torch import Tensor

from kdistill.config import TrainSettings
from kdistill.planning.advice import advise
from kdistill.planning.estimate import Built, Probed, evaluation_batch
from kdistill.planning.memory import Part, Phase, Stage
from kdistill.planning.probe import HEAP_MAX, heap_bytes, tensor_bytes
from kdistill.planning.steps import Forward, StepProbe, trainable

OPTIMISER_COPIES = {"adam": 2, "adamw": 2}  # exp_avg and exp_avg_sq; SGD: its momentum


def _copies(settings: TrainSettings) -> int:
    opt = settings.optimizer
    return OPTIMISER_COPIES.get(opt.name, 1 if opt.momentum > 0 else 0)


class _Composer:
    """Builds the phases of each stage from `Probed`, stage by stage, in the run's order."""

    def __init__(self, p: Probed) -> None:
        self.p = p
        self.on_host = p.device.type == "cpu"
        self.warm = False  # the first optimiser step's modules are loaded
        params = trainable(p.student.module, p.method)
        self.trained = sum(tensor_bytes(t) for t in params)
        self.trained_heap = heap_bytes(params)
        # malloc's heap: the largest it has been so far (glibc only; None: not modelled)
        self.heap: int | None = 0 if self.on_host and sys.platform.startswith("linux") else None

    def phase(self, stage: str, name: str, parts: list[Part]) -> Phase:
        """A phase, created in the run's order: it holds at least the heap of earlier ones."""
        if self.heap is not None:
            live = sum(q.heap for q in parts)
            if self.heap > live:
                parts = [*parts, Part("freed heap kept by malloc", self.heap - live, host=True,
                                      heap=self.heap - live)]
            self.heap = max(self.heap, live)
        online = any(self.p.online) and self.p.method.uses_teacher
        return Phase(name, tuple(parts), tuple(advise(
            self.p.cfg, stage, parts, precision=self.p.precision, online_teacher=online)))

    def base(self, teachers: list[Built]) -> list[Part]:
        p = self.p
        parts = [Part("runtime", p.runtime + p.code + (p.optimiser_modules if self.warm else 0),
                      host=True), Part("data", p.data.resident, host=True)]
        for t in teachers:
            parts.append(Part(f"{t.role} weights", t.weights, heap=t.weights_heap))
            if t.kept:
                parts.append(Part(f"{t.role} loader copies", t.kept, host=True))
            if t.train is not None:  # its last gradients, freed by no later step
                params = list(t.module.parameters())
                parts.append(Part(f"{t.role} gradients (kept)", tensor_bytes(params),
                                  heap=heap_bytes(params)))
        return parts

    def build(self, stage: str, base: list[Part], b: Built) -> Phase:
        copies = f"{b.role} loader copies"
        kept = [Part(copies, b.kept, host=True)] if b.kept and copies not in {
            q.name for q in base} else []
        return self.phase(stage, f"building the {b.role}", [
            *base, Part(f"{b.role} weights", b.weights, heap=b.weights_heap), *kept,
            Part("building (transient)", b.build_peak, host=True)])

    def training(self, stage: str, base: list[Part], who: Built, settings: TrainSettings,
                 step: StepProbe, trained: list[Tensor]) -> list[Phase]:
        """A micro-step, the optimiser step and validation of `who`, with its weights,
        gradients and optimiser state (`trained`: its trainable tensors)."""
        if not self.warm:  # this is the run's first optimiser step
            self.warm = True
            base = [q if q.name != "runtime" else Part(
                "runtime", q.bytes + self.p.optimiser_modules, host=True) for q in base]
        sizes = [tensor_bytes(t) for t in trained]
        grads, grads_heap, largest = sum(sizes), heap_bytes(trained), max(sizes, default=0)
        copies = _copies(settings)
        name = "student" if who is self.p.student else who.role
        state = [Part(f"{name} weights", who.weights, heap=who.weights_heap),
                 Part(f"{name} gradients", grads, heap=grads_heap),
                 Part(f"optimiser state ({settings.optimizer.name})", copies * grads,
                      heap=copies * grads_heap)]
        # The CPU's single-tensor Adam makes two temporaries of each tensor in turn; the
        # foreach path on accelerators makes one of all of them at once.
        temp = (2 * largest if self.on_host else grads) if copies else 0
        val = who.validation
        assert who.forward is not None
        return [
            self.phase(stage, f"a training step ({self.micro(settings)} samples)",
                       [*base, *state, *self.step_parts(step, settings, name)]),
            self.phase(stage, "the optimiser step", [
                *base, *state, Part("optimiser temporaries", temp,
                                    heap=temp if largest < HEAP_MAX else 0)]),
            self.phase(stage, f"validation ({val} samples)", [
                *base, *state, self.forward_part("validation forward", who.forward, val)]),
        ]

    @staticmethod
    def micro(settings: TrainSettings) -> int:
        return math.ceil(settings.batch_size / settings.grad_accum)

    def step_parts(self, step: StepProbe, settings: TrainSettings, who: str) -> list[Part]:
        """A micro-step's activations, teacher outputs, and the rest of its peak (the loss's
        buffers and the backward pass's temporaries)."""
        micro = self.micro(settings)
        (act, act_heap), (teacher, t_heap) = (step.activations.replay(micro),
                                              step.teacher.replay(micro))
        peak, peak_heap = step.peak.replay(micro)
        parts = [Part(f"{who} activations", act, heap=act_heap),
                 Part("loss and backward buffers", max(0, peak - act - teacher),
                      heap=max(0, peak_heap - act_heap - t_heap))]
        if teacher:
            parts.append(Part("teacher outputs", teacher, heap=t_heap))
        return parts

    @staticmethod
    def forward_part(name: str, forward: Forward, batch: int) -> Part:
        """A no-grad forward at `batch` and one copy of its output (the scores' softmax)."""
        (peak, heap), (out, out_heap) = forward.peak.replay(batch), forward.output.replay(batch)
        return Part(name, peak + out, heap=heap + out_heap)

    def teach(self) -> list[Stage]:
        p, out = self.p, []
        for k, t in enumerate(p.teachers):
            before = self.base(p.teachers[:k])
            phases = [self.build("teach", before, t)]
            if t.kept:
                before.append(Part(f"{t.role} loader copies", t.kept, host=True))
            if t.train is not None and t.step is not None:
                phases += self.training("teach", before, t, t.train, t.step,
                                        list(t.module.parameters()))
            if k == len(p.teachers) - 1:  # then the student is built once to check it
                phases.append(self.build("teach", self.base(p.teachers), p.student))
            out.append(Stage("teach", tuple(phases), self.on_host))
        return out

    def cache(self) -> list[Stage]:
        p, out = self.p, []
        for t, size in zip(p.teachers, p.cache_size, strict=True):
            if not size or t.cache_forward is None:
                continue
            fwd, heap = t.cache_forward.peak.replay(p.cache_step)
            parts = [*self.base(p.teachers), Part(
                f"cache batch forward ({p.cache_step} samples)", fwd, heap=heap)]
            if p.cfg.cache.topk is not None:  # build_cache's log-softmax copy of the logits
                copy, copy_heap = t.cache_forward.output.replay(p.cache_step)
                parts.append(Part("top-k log-softmax copy", copy, heap=copy_heap))
            parts.append(Part("teacher cache (written)", size, host=True, reclaimable=True))
            out.append(Stage("cache", (self.phase("cache", f"a cache batch ({p.cache_step} "
                                                  "samples)", parts),), self.on_host))
        return out

    def kept(self, count: int) -> list[Part]:
        """The student's loader copies (from its first build, in the teach stage on) and
        `count` trained students still held, with their last gradients."""
        s = self.p.student
        parts = [Part("student loader copies", s.kept, host=True)] if s.kept else []
        if count > 0:
            parts.append(Part(f"{count} trained model(s) kept (weights and gradients)",
                              count * (s.weights + self.trained),
                              heap=count * (s.weights_heap + self.trained_heap)))
        return parts

    def students(self) -> list[Stage]:
        p, cfg, out = self.p, self.p.cfg, []
        with_base = int(cfg.baseline)
        earlier = (len(cfg.train.seeds) - 1) * (with_base + cfg.generations)
        assert p.student.forward is not None
        for name, step, kept in (("baseline", p.baseline_step, earlier),
                                 ("student", p.student_step, earlier + with_base)):
            if step is None:
                continue
            base = [*self.base(p.teachers), *self.kept(kept)]
            if name == "student" and any(p.cache_size):
                base.append(Part("teacher cache (read)", sum(p.cache_size), host=True,
                                 reclaimable=True))
            phases = [self.build(name, base, p.student), *self.training(
                name, base, p.student, cfg.train, step, trainable(p.student.module, p.method))]
            out.append(Stage(name, tuple(phases), self.on_host))
        return out

    def evaluate(self) -> list[Stage]:
        p, cfg = self.p, self.p.cfg
        base = [*self.base(p.teachers),
                *self.kept(len(cfg.train.seeds) * (int(cfg.baseline) + cfg.generations))]
        if any(p.cache_size):  # the run keeps the cache open (mapped) to its end
            base.append(Part("teacher cache (read)", sum(p.cache_size), host=True,
                             reclaimable=True))
        test = evaluation_batch(p.task, cfg, p.splits)
        phases = []
        for b in [*p.teachers, p.student]:
            assert b.forward is not None
            phases.append(self.phase("evaluate", f"the {b.role} on a test batch ({test} "
                                     "samples)", [*base, self.forward_part(
                                         "evaluation forward", b.forward, test)]))
        report = self.phase("report", "writing the report", [
            *base, Part("plotting libraries", p.report_libraries, host=True)])
        return [Stage("evaluate", tuple(phases), self.on_host),
                Stage("report", (report,), self.on_host)]


def compose(p: Probed) -> list[Stage]:
    """Every stage of the run with its phases, in the run's order."""
    c = _Composer(p)
    prepare = Stage("prepare", (c.phase("prepare", "loading the data", [
        Part("runtime", p.runtime + p.code, host=True),
        Part("data (while loading)", p.data.peak, host=True)]),), c.on_host)
    return [prepare, *c.teach(), *c.cache(), *c.students(), *c.evaluate()]
