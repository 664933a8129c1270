"""The memory plan as data: stages, their phases and parts, the device's capacity, and what to
change when it does not fit; rendered as a plain table and one line.

A stage's peak is the largest of its phases (building a model, a training step, the optimiser
step, validation, a cache batch, an evaluation batch); the table shows that phase's parts. The
run's peak is the largest stage. Parts marked `host` live in host memory whatever the device
(the interpreter and libraries, the data, the memory-mapped teacher cache): on the CPU they
count, on an accelerator they are shown but not compared with its memory. Parts marked
`reclaimable` are file pages (the cache as it is written or read): they show in the resident
set, which is what the plan reproduces, but the kernel drops them under pressure, so they are
left out of the comparison with the capacity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MB = 2**20
GB = 2**30


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    host: bool = False  # in host memory on every device (not in an accelerator's memory)
    reclaimable: bool = False  # file pages the kernel can drop (not a cause of OOM)
    heap: int = 0  # of `bytes`, what sits in malloc's heap (pieces under 32 MiB; CPU only)


@dataclass(frozen=True)
class Advice:
    saves: int  # estimated bytes off the stage's peak
    text: str  # names the recipe field(s) to change


@dataclass(frozen=True)
class Phase:
    """One moment of a stage: what is in memory then, and what would lower it."""

    name: str  # e.g. "a training step (64 samples)"
    parts: tuple[Part, ...]
    advice: tuple[Advice, ...] = ()

    def total(self, *, on_host: bool, fitting: bool = False) -> int:
        """Bytes in the device's memory (everything when the device is the host); `fitting`
        leaves out the reclaimable file pages."""
        return sum(p.bytes for p in self.parts if (on_host or not p.host)
                   and not (fitting and p.reclaimable))


@dataclass(frozen=True)
class Stage:
    """A stage of the run (prepare, teach, cache, baseline, student, evaluate, report) and its
    phases; its peak is the largest phase."""

    name: str
    phases: tuple[Phase, ...]
    on_host: bool = True  # the device is the host: host parts count

    def peak_phase(self, *, fitting: bool = False) -> Phase:
        return max(self.phases, key=lambda ph: ph.total(on_host=self.on_host, fitting=fitting))

    @property
    def phase(self) -> str:
        return self.peak_phase().name

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.peak_phase().parts

    def total(self, *, fitting: bool = False) -> int:
        return self.peak_phase(fitting=fitting).total(on_host=self.on_host, fitting=fitting)


@dataclass
class MemoryPlan:
    """Estimated peak memory per stage of a run on one device and precision."""

    device: str
    precision: str
    stages: list[Stage]
    capacity: int | None  # bytes the run may use on the device; None when unknown
    capacity_note: str  # where `capacity` comes from, or why it is unknown
    notes: list[str] = field(default_factory=list)

    @property
    def on_host(self) -> bool:
        return self.device.split(":")[0] == "cpu"

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda s: s.total())

    @property
    def peak(self) -> int:
        """The run's estimated peak in the device's memory (on the CPU: its resident set)."""
        return self.peak_stage.total()

    @property
    def needed(self) -> int:
        """The peak less reclaimable file pages: what must fit in `capacity`."""
        return max(s.total(fitting=True) for s in self.stages)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.needed <= self.capacity

    def over(self) -> list[tuple[Stage, Phase]]:
        """The phases that do not fit the capacity (none when it is unknown)."""
        if self.capacity is None:
            return []
        return [(s, ph) for s in self.stages for ph in s.phases
                if ph.total(on_host=self.on_host, fitting=True) > self.capacity]

    def advice(self) -> list[Advice]:
        """The knobs that lower the phases over capacity, largest saving first (one entry per
        knob, with its largest saving)."""
        best: dict[str, Advice] = {}
        for _, phase in self.over():
            for a in phase.advice:
                if a.text not in best or a.saves > best[a.text].saves:
                    best[a.text] = a
        return sorted(best.values(), key=lambda a: -a.saves)

    def warnings(self) -> list[str]:
        """Empty when the plan fits (or the capacity is unknown); else the excess and the knobs
        that lower the peak most for this plan, largest saving first."""
        over = self.over()
        if not over:
            return []
        assert self.capacity is not None
        names = ", ".join(dict.fromkeys(s.name for s, _ in over))
        lines = [f"the plan needs {self.needed / GB:.2f} GB (stages over: {names}) but "
                 f"{self.device} has {self.capacity / GB:.2f} GB ({self.capacity_note})"]
        lines += [f"{a.text} (about {a.saves / MB:,.0f} MB less)" for a in self.advice()]
        return lines

    def table(self) -> str:
        """Markdown rows: stage, phase, part, MB; each stage's total; the capacity."""
        rows = ["| stage | at its peak | part | MB |", "|---|---|---|---:|"]
        for stage in self.stages:
            for part in stage.parts:
                if part.bytes < MB // 20:  # 0.0 in the table: left out
                    continue
                where = " (host)" if part.host and not self.on_host else ""
                where += " (file pages)" if part.reclaimable else ""
                rows.append(f"| {stage.name} | {stage.phase} | {part.name}{where} | "
                            f"{part.bytes / MB:,.1f} |")
            rows.append(f"| **{stage.name}** | | **total** | **{stage.total() / MB:,.1f}** |")
        cap = "unknown" if self.capacity is None else f"{self.capacity / MB:,.1f}"
        rows.append(f"| capacity | {self.capacity_note} | {self.device} | {cap} |")
        return "\n".join(rows)

    def one_line(self) -> str:
        """e.g. "memory plan (cpu, fp32): peak 1.21 GB in the student stage (activations 0.63,
        ...); 24.0 GB available"."""
        stage = self.peak_stage
        parts = sorted((p for p in stage.parts if self.on_host or not p.host),
                       key=lambda p: -p.bytes)[:4]
        shown = ", ".join(f"{p.name} {p.bytes / GB:.2f}" for p in parts)
        cap = (self.capacity_note if self.capacity is None
               else f"{self.capacity / GB:.1f} GB available")
        line = (f"memory plan ({self.device}, {self.precision}): peak {self.peak / GB:.2f} GB "
                f"in the {stage.name} stage ({shown}); {cap}")
        return line + (" - over: see `kdistill plan`" if self.fits is False else "")


def capacity(device: str) -> tuple[int | None, str]:
    """(bytes a run may use on `device`, where that number comes from)."""
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return free, f"free of {total / GB:.1f} GB (torch.cuda.mem_get_info)"
    if kind != "cpu":
        return None, f"{kind} memory cannot be queried: capacity unknown"
    info = _meminfo()
    if "MemAvailable" in info:  # what a new allocation can get, plus what this process holds
        own = _own_rss()
        return info["MemAvailable"] + own, "MemAvailable + this process's resident set"
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, "the host's memory cannot be queried: capacity unknown"
    return pages * size, "total RAM (os.sysconf)"


def _meminfo() -> dict[str, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return out


def _own_rss() -> int:
    from kdistill.planning.probe import rss

    now = rss()
    return now.rss if now is not None else 0
