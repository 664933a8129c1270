"""`kdistill run` on translation data end to end (tiny models, a few hundred real pairs):
teacher -> word-level KD, then sequence-level KD and cross-attention distillation from the
same teacher's weights; BLEU / chrF rows in eval.json, report.md and report.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.config import load_config
from kdistill.data.translation import LOCALE_DIR
from kdistill.pipeline.order import run

from .conftest import REPO

pytestmark = pytest.mark.skipif(not any((LOCALE_DIR / "de" / "LC_MESSAGES").glob("*.mo")),
                                reason="no German gettext catalogs on this machine")

TINY = ["data.train_limit=200", "data.vocab_size=300", "data.val_size=30",
        "data.test_size=0.001", "teacher.model.args={d_model: 32, heads: 2, enc_layers: 1, "
        "dec_layers: 2, ff: 64}", "student.model.args={d_model: 16, heads: 2, enc_layers: 1, "
        "dec_layers: 1, ff: 32}", "teacher.train.epochs=2", "train.epochs=1", "train.seeds=[0]",
        "eval.batch_size=64", "eval.beam=2", "eval.samples=2"]


def _run(tmp_path: Path, name: str, *extra: str) -> tuple[Path, list[str]]:
    lines: list[str] = []
    cfg = load_config(REPO / "recipes" / "translate-en-de.yaml",
                      [*TINY, f"output_dir={tmp_path}", f"name={name}", *extra])
    result = run(cfg, echo=lines.append)
    return result.run_dir, lines


def test_translation_recipe_end_to_end(tmp_path: Path) -> None:
    run_dir, lines = _run(tmp_path, "wkd")
    rows = json.loads((run_dir / "eval.json").read_text())
    assert set(rows) == {"teacher", "baseline", "student"}
    for role in rows:
        row = rows[role][0]
        for key in ("bleu", "chrf", "bleu_greedy", "chrf_greedy", "perplexity", "throughput",
                    "latency_ms", "beam_throughput", "params", "bytes"):
            assert key in row and row[key] >= 0, (role, key)
    assert rows["student"][0]["params"] < rows["teacher"][0]["params"]
    assert "agreement" in rows["student"][0]
    report = (run_dir / "report.md").read_text()
    assert "BLEU (beam)" in report and "Beam translations" in report
    assert "BLEU" in (run_dir / "report.html").read_text()
    assert (run_dir / "tokenizer.json").is_file()
    assert any("top-16 log-probabilities" in line for line in lines)
    samples = json.loads((run_dir / "samples.json").read_text())
    assert len(samples) == 2 and "reference:" in samples[0]["prompt"]
    _, again = _run(tmp_path, "wkd")  # every stage done: loaded, only evaluated
    assert sum("done earlier" in line for line in again) == 3

    weights = [f"teacher.model.weights={run_dir / 'teacher' / 'model.safetensors'}",
               "teacher.train=null"]
    seq_dir, seq_lines = _run(tmp_path, "seqkd", *weights, "method={name: seq_kd, beam: 2}",
                              "cache.topk=null")
    assert any("seq_kd: beam-2 translations" in line for line in seq_lines)
    assert list((seq_dir / "cache" / "method").glob("seq_kd-*.safetensors"))
    seq_rows = json.loads((seq_dir / "eval.json").read_text())
    # The same teacher weights: its test scores are the first run's.
    assert seq_rows["teacher"][0]["bleu"] == pytest.approx(rows["teacher"][0]["bleu"])
    assert seq_rows["baseline"][0]["perplexity"] == pytest.approx(
        rows["baseline"][0]["perplexity"])
    att_dir, att_lines = _run(tmp_path, "xattn", *weights, "method={name: cross_attn, pairs: "
                              "[[decoder.0.cross_attn.probs, decoder.1.cross_attn.probs]]}")
    assert any("decoder.1.cross_attn.probs" in line and "cache" in line for line in att_lines)
    records = [json.loads(x) for x in
               (att_dir / "seed-0" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/attn" in r for r in records)
