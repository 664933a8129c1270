"""What to change when a phase does not fit: the recipe fields that lower it, with a rough
saving for each (the plan sorts them by saving, largest first)."""

from __future__ import annotations

from kdistill.config import RunConfig
from kdistill.planning.memory import MB, Advice, Part


def advise(cfg: RunConfig, stage: str, parts: tuple[Part, ...] | list[Part], *,
           precision: str, online_teacher: bool) -> list[Advice]:
    """The knobs for one phase of `stage` made of `parts`."""
    sizes: dict[str, int] = {}
    for part in parts:
        sizes[part.name] = sizes.get(part.name, 0) + part.bytes
    field = "teacher.train" if stage == "teach" else "train"
    act = sum(v for k, v in sizes.items() if k.endswith("activations"))
    buffers = sizes.get("loss and backward buffers", 0)
    out: list[Advice] = []
    if act + buffers:
        out.append(Advice((act + buffers) // 2, f"activations and loss buffers are "
                          f"{(act + buffers) / MB:,.0f} MB: halve {field}.batch_size or set "
                          f"{field}.grad_accum=2"))
        if precision == "fp32":
            out.append(Advice(act // 2, f"{field}.precision: bf16 stores activations in 16 bits"))
    # token_kd's chunked loss works on dense teacher logits (a top-k cache ignores chunk_size)
    if (stage == "student" and buffers > act and cfg.cache.topk is None
            and getattr(cfg.method, "chunk_size", 0) is None):
        out.append(Advice(buffers // 2, f"the loss buffers are {buffers / MB:,.0f} MB: set "
                          "method.chunk_size (e.g. 256) to compute the loss in chunks"))
    opt = sizes.get("optimiser state (adam)", 0) + sizes.get("optimiser state (adamw)", 0)
    if opt:
        out.append(Advice(opt // 2, f"the optimiser state is {opt / MB:,.0f} MB: "
                          f"{field}.optimizer.name: sgd keeps one copy instead of two"))
    teacher = sizes.get("teacher outputs", 0) + sizes.get("teacher weights", 0)
    if stage == "student" and online_teacher and teacher:
        out.append(Advice(sizes.get("teacher outputs", 0), "the online teacher holds "
                          f"{teacher / MB:,.0f} MB: cache its outputs (cache.enabled, "
                          "cache.max_mb, cache.topk for language models) or put it on "
                          "another device (teacher.device)"))
    for name, value in sizes.items():
        if name.startswith("cache batch forward"):
            out.append(Advice(value // 2, f"the cache batch takes {value / MB:,.0f} MB: "
                              "halve cache.batch_size"))
        if name == "evaluation forward":
            out.append(Advice(value // 2, f"the evaluation batch takes {value / MB:,.0f} MB: "
                              "halve eval.batch_size (and eval.throughput_batch)"))
    return out
