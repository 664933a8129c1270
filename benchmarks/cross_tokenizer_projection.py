"""How well a teacher's next-token distribution carries over to the student's tokenizer
(`arch: projected_lm`, `kdistill.models.cross_tokenizer`), on the real pair of
`recipes/llm-cross-tokenizer.yaml`: SmolLM2's 49,152-token vocabulary and the student's BPE.

Over the recipe's test blocks (student tokens), per student position:
- `aligned`: both tokenizations have a boundary where the student's prefix ends;
- `fallback`: the observed next teacher token does not map to the observed next student token
  (the student's token runs past the teacher's, or its BPE chose another first token), so the
  target there is the observed token (KD = CE). Measured with an oracle teacher (all mass on
  the observed next teacher token), so it depends on the two tokenizations only.
With the real teacher on the first `--teacher-blocks` blocks: `covered`, the mean teacher mass
in its top `candidates` (the rest is never looked at); `kept`, the mean share of that top
mass consistent with the text read so far (the rest is dropped before renormalising), over
every position with a teacher position before it; the fallbacks (tokenizations, or no
consistent candidate); and the time of the teacher's forward (with re-tokenising the blocks)
against the projection's (`targets`: alignment and vocabulary mapping).

Run (after `kdistill tokenizer recipes/llm-cross-tokenizer.yaml --vocab-size 4096 --out
runs/tokenizers/stdlib-bpe4k`):
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cross_tokenizer_projection.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from kdistill.config import load_config
from kdistill.data.source import LoadContext
from kdistill.models.cross_tokenizer import SEPARATOR, OracleLM, ProjectedLM, Projection
from kdistill.models.hf import load_tokenizer, pretrained_causal_lm


def aligned_share(proj: Projection, blocks: Tensor) -> float:
    aligned = total = 0
    for ids in blocks.tolist():
        row = proj.row(ids)
        ends = set(row.teacher_ends)
        for e in row.student_ends[:-1]:
            aligned += e in ends
            total += 1
    return aligned / total


def kept_mass(proj: Projection, model: ProjectedLM, blocks: Tensor) -> tuple[float, float]:
    """(covered, kept): the mean teacher mass in its top candidates, and the mean consistent
    share of it, over the positions with a teacher position before them."""
    rows = [proj.row(ids) for ids in blocks.tolist()]
    top_ids, top_probs = model.teacher_top(rows)
    shares, covered = [], []
    for i, row in enumerate(rows):
        for e in row.student_ends[:-1]:
            u, s = proj.context(row, e)
            if u < 0 or SEPARATOR in s:
                continue
            total = sum(top_probs[i][u])
            ok = sum(p for w, p in zip(top_ids[i][u], top_probs[i][u], strict=True)
                     if proj.student_token(w, s) >= 0)
            shares.append(ok / total)
            covered.append(total)
    return sum(covered) / len(covered), sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/llm-cross-tokenizer.yaml")
    parser.add_argument("--teacher-blocks", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.recipe)
    splits = cfg.data.load(LoadContext())
    spec = cfg.teacher.model.args
    teacher_tok = load_tokenizer(spec.get("path", "smollm2"))
    proj = Projection(teacher_tok, load_tokenizer(spec["tokenizer"]))
    blocks = splits.test_x
    oracle = ProjectedLM(OracleLM(len(teacher_tok)), proj, candidates=1)
    for start in range(0, len(blocks), 32):
        oracle(blocks[start:start + 32])
    print(f"test blocks {tuple(blocks.shape)}: aligned {aligned_share(proj, blocks):.3f}, "
          f"fallback (tokenizations) {oracle.fallbacks / oracle.positions:.3f}")
    candidates = int(spec.get("candidates", 64))
    teacher = ProjectedLM(pretrained_causal_lm((blocks.shape[1],), len(teacher_tok),
                                               path=spec.get("path", "smollm2")),
                          proj, candidates=candidates)
    few = blocks[: args.teacher_blocks]
    t0 = time.perf_counter()
    rows = [proj.row(ids) for ids in few.tolist()]
    top = teacher.teacher_top(rows)
    t1 = time.perf_counter()
    for i, (row, ids) in enumerate(zip(rows, few.tolist(), strict=True)):
        proj.targets(row, [*ids[1:], None], top[0][i], top[1][i])
    t2 = time.perf_counter()
    teacher(few)
    fallback = teacher.fallbacks / teacher.positions
    covered, kept = kept_mass(proj, teacher, few)
    print(f"real teacher, {len(few)} blocks, top {candidates}: covered {covered:.3f}, kept "
          f"{kept:.3f}, fallback {fallback:.3f}; teacher forward with re-tokenising "
          f"{t1 - t0:.2f} s, projection {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
