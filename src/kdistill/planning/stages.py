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
- evaluate: every model on the test set at the task's batch.
- report: the plotting libraries on top of everything still held.

From the first training phase on, the modules that the first optimiser step imports are
resident. Gradients are counted whole in every training phase: with grad_accum > 1 they are
alive from the second micro-batch on; with 1 they grow during the backward pass, so this
overstates the peak by at most their size.
"""

from __future__ import annotations

import math

from kdistill.config import TrainSettings
from kdistill.planning.advice import advise
from kdistill.planning.estimate import Built, Probed, eval_batches
from kdistill.planning.memory import Part, Phase, Stage
from kdistill.planning.probe import tensor_bytes
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
        sizes = [tensor_bytes(t) for t in params]
        self.trained, self.largest = sum(sizes), max(sizes, default=0)

    def phase(self, stage: str, name: str, parts: list[Part]) -> Phase:
        online = any(self.p.online) and self.p.method.uses_teacher
        return Phase(name, tuple(parts), tuple(advise(
            self.p.cfg, stage, parts, precision=self.p.precision, online_teacher=online)))

    def base(self, teachers: list[Built]) -> list[Part]:
        p = self.p
        parts = [Part("runtime", p.runtime + p.code + (p.optimiser_modules if self.warm else 0),
                      host=True), Part("data", p.data.resident, host=True)]
        for t in teachers:
            parts.append(Part(f"{t.role} weights", t.weights))
            if t.kept:
                parts.append(Part(f"{t.role} loader copies", t.kept, host=True))
            if t.train is not None:
                parts.append(Part(f"{t.role} gradients (kept)", t.weights))
        return parts

    def build(self, stage: str, base: list[Part], b: Built) -> Phase:
        copies = f"{b.role} loader copies"
        kept = [Part(copies, b.kept, host=True)] if b.kept and copies not in {
            q.name for q in base} else []
        return self.phase(stage, f"building the {b.role}", [
            *base, Part(f"{b.role} weights", b.weights), *kept,
            Part("building (transient)", b.build_peak, host=True)])

    def training(self, stage: str, base: list[Part], who: str, weights: tuple[int, int, int],
                 settings: TrainSettings, step: StepProbe, forward: Forward) -> list[Phase]:
        """A micro-step, the optimiser step and validation, with the weights, gradients and
        optimiser state; `weights` = (all, trainable, largest trainable tensor) bytes."""
        if not self.warm:  # this is the run's first optimiser step
            self.warm = True
            base = [q if q.name != "runtime" else Part(
                "runtime", q.bytes + self.p.optimiser_modules, host=True) for q in base]
        total, trained, largest = weights
        copies = _copies(settings)
        state = [Part(f"{who} weights", total), Part(f"{who} gradients", trained),
                 Part(f"optimiser state ({settings.optimizer.name})", copies * trained)]
        micro = math.ceil(settings.batch_size / settings.grad_accum)
        act, teacher = step.activations.at(micro), step.teacher.at(micro)
        rest = max(0, step.peak.at(micro) - act - teacher)
        step_parts = [Part(f"{who} activations", act), Part("loss and backward buffers", rest),
                      *([Part("teacher outputs", teacher)] if teacher else [])]
        # The CPU's single-tensor Adam makes two temporaries of each tensor in turn; the
        # foreach path on accelerators makes one of all of them at once.
        temp = (2 * largest if self.on_host else trained) if copies else 0
        val, _ = eval_batches(self.p.task, self.p.cfg, self.p.splits)
        return [
            self.phase(stage, f"a training step ({micro} samples)", [*base, *state,
                                                                     *step_parts]),
            self.phase(stage, "the optimiser step", [*base, *state,
                                                     Part("optimiser temporaries", temp)]),
            self.phase(stage, f"validation ({val} samples)", [
                *base, *state, Part("validation forward", forward.peak.at(val)
                                    + forward.output.at(val))]),
        ]

    def teach(self) -> list[Stage]:
        p, out = self.p, []
        for k, t in enumerate(p.teachers):
            before = self.base(p.teachers[:k])
            phases = [self.build("teach", before, t)]
            if t.kept:
                before.append(Part(f"{t.role} loader copies", t.kept, host=True))
            if t.train is not None and t.step is not None and t.forward is not None:
                sizes = [tensor_bytes(q) for q in t.module.parameters()]
                phases += self.training("teach", before, t.role,
                                        (t.weights, sum(sizes), max(sizes, default=0)),
                                        t.train, t.step, t.forward)
            if k == len(p.teachers) - 1:  # then the student is built once to check it
                phases.append(self.build("teach", self.base(p.teachers), p.student))
            out.append(Stage("teach", tuple(phases), self.on_host))
        return out

    def cache(self) -> list[Stage]:
        p, out = self.p, []
        for t, size in zip(p.teachers, p.cache_size, strict=True):
            if not size or t.cache_forward is None:
                continue
            parts = [*self.base(p.teachers), Part(
                f"cache batch forward ({p.cache_step} samples)",
                t.cache_forward.peak.at(p.cache_step))]
            if p.cfg.cache.topk is not None:  # build_cache's log-softmax copy of the logits
                parts.append(Part("top-k log-softmax copy",
                                  t.cache_forward.output.at(p.cache_step)))
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
                              count * (s.weights + self.trained)))
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
                name, base, "student", (p.student.weights, self.trained, self.largest),
                cfg.train, step, p.student.forward)]
            out.append(Stage(name, tuple(phases), self.on_host))
        return out

    def evaluate(self) -> list[Stage]:
        p, cfg = self.p, self.p.cfg
        base = [*self.base(p.teachers),
                *self.kept(len(cfg.train.seeds) * (int(cfg.baseline) + cfg.generations))]
        _, test = eval_batches(p.task, cfg, p.splits)
        phases = []
        for b in [*p.teachers, p.student]:
            assert b.forward is not None
            phases.append(self.phase("evaluate", f"the {b.role} on a test batch ({test} "
                                     "samples)", [*base, Part("evaluation forward",
                                                              b.forward.peak.at(test)
                                                              + b.forward.output.at(test))]))
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
