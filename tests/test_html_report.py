"""report.html: sections, one comparison table, embedded plots, escaping, errors, and a real
browser rendering it (headless Chromium, when installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill import load_config, run
from kdistill.errors import ConfigError
from kdistill.report.html import write_html_report

# The built-in default recipe (MNIST-1D), cut to seconds: two seeds so cells read mean ± std.
FAST = ["teacher.train.epochs=2", "train.epochs=3", "train.eval_every_epochs=1",
        "train.seeds=[0,1]", "train.log_every=5", "eval.latency_repeats=3",
        "eval.throughput_batch=16"]
SECTIONS = ["Summary", "Loss terms (training)", "Validation accuracy per epoch",
            "Pareto view", "Per-class accuracy gaps", "Recipe (resolved)"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real runs: the default recipe, and one without a baseline under another name."""
    out = tmp_path_factory.mktemp("runs")
    full = run(load_config(None, [*FAST, f"output_dir={out}"]), echo=lambda _: None)
    alone = run(load_config(None, [*FAST, f"output_dir={out}", "name=nobase", "baseline=false"]),
                echo=lambda _: None)
    return {"full": full.run_dir, "nobase": alone.run_dir}


def _section(page: str, heading: str) -> str:
    """The HTML between a <h2> starting with `heading` and the next <h2>."""
    start = page.index(f"<h2>{heading}")
    end = page.find("<h2>", start + 1)
    return page[start:end if end != -1 else len(page)]


def test_single_run_page_is_self_contained(runs: dict[str, Path]) -> None:
    path = write_html_report([runs["full"]])
    assert path == runs["full"] / "report.html"
    page = path.read_text(encoding="ascii")  # non-ASCII is written as character references
    for heading in SECTIONS:
        assert f"<h2>{heading}" in page, heading
    # Plots are PNG data URIs: loss terms, validation curve, Pareto, class gaps.
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) == 4
    assert all(src.startswith("data:image/png;base64,iVBOR") for src in images)
    # No script, stylesheet link or URL to fetch: it opens offline, from an e-mail attachment.
    assert not re.search(r"<script|<link|<iframe|src=\"http|url\(", page, re.IGNORECASE)
    summary = _section(page, "Summary")
    assert summary.count("<table>") == 1
    assert "distilled student" in summary and "student alone (baseline)" in summary
    assert "&#177;" in summary  # mean ± std over the two seeds
    gaps = _section(page, "Per-class accuracy gaps")
    assert "student &#8722; baseline" in gaps and "student &#8722; teacher" in gaps
    assert gaps.count("<tr>") == 1 + 10  # header + MNIST-1D's ten classes
    assert "method:" in _section(page, "Recipe") and "name: kd" in page


def test_several_runs_share_one_table(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_html_report([runs["full"], runs["nobase"]], tmp_path / "compare.html")
    page = out.read_text(encoding="ascii")
    summary = _section(page, "Summary")
    assert summary.count("<table>") == 1
    header = re.search(r"<tr>(.*?)</tr>", summary).group(1)
    assert header.startswith('<th class="label">run</th><th class="label">model</th>')
    assert summary.count('<td class="label">default</td>') == 3  # teacher, baseline, student
    assert summary.count('<td class="label">nobase</td>') == 2  # no baseline row
    # Per-run sections under each run's name; the run without a baseline has one gap only.
    gaps = _section(page, "Per-class accuracy gaps")
    nobase = gaps[gaps.index("<h3>nobase</h3>"):]
    assert "student &#8722; teacher" in nobase and "baseline" not in nobase
    with pytest.raises(ConfigError, match="--out"):
        write_html_report([runs["full"], runs["nobase"]])


def test_recipe_and_samples_are_escaped_lm_run_without_classes(tmp_path: Path) -> None:
    """A causal-LM run (written by hand: no model needed): perplexity plots, no class gaps,
    samples shown; text from the files cannot inject markup."""
    run_dir = tmp_path / "lm"
    (run_dir / "seed-0" / "student").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: lm\nmethod: {name: gkd}\n# <script>x</script>\n")
    row = {"perplexity": 40.0, "accuracy": 0.3, "params": 1000, "bytes": 4000,
           "latency_ms": 5.0, "throughput": 100.0}
    rows = {"teacher": [{**row, "params": 9000, "perplexity": 20.0, "seed": None}],
            "student": [{**row, "agreement": 0.5, "seed": 0}]}
    (run_dir / "eval.json").write_text(json.dumps(rows))
    records = [{"step": s, "epoch": s // 2, "split": "train", "loss/kd": 1.0 / s}
               for s in (1, 2, 3)]
    records += [{"step": 2, "epoch": 0, "split": "val", "perplexity": 60.0},
                {"step": 4, "epoch": 1, "split": "val", "perplexity": 45.0}]
    lines = [json.dumps(r) for r in records] + ['{"step": 5, "spl']  # a killed run's last line
    (run_dir / "seed-0" / "student" / "metrics.jsonl").write_text("\n".join(lines))
    samples = [{"prompt": "def f(a<b):", "teacher": "return </td>", "student": "x" + "\n" * 20}]
    (run_dir / "samples.json").write_text(json.dumps(samples))
    page = write_html_report([run_dir]).read_text(encoding="ascii")
    assert "<h2>Validation perplexity per epoch" in page
    assert "no classes to compare" in page
    assert "<script" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    samples_html = _section(page, "Greedy continuations")
    assert "def f(a&lt;b):" in samples_html and "return &lt;/td&gt;" in samples_html
    assert "x\n[19 empty lines]\n" in samples_html  # counted, not a screen of white
    assert "test perplexity" in _section(page, "Summary")
    assert len(re.findall(r'<img src="data:image/png', page)) == 3  # loss, val, Pareto


def test_not_a_run_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"missing eval.json; expected a run directory"):
        write_html_report([tmp_path])
    with pytest.raises(ConfigError, match="not a directory"):
        write_html_report([tmp_path / "nope"])


def test_cli_report(runs: dict[str, Path], tmp_path: Path) -> None:
    def kdistill(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kdistill", "report", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "cli" / "both.html"
    proc = kdistill(str(runs["full"]), str(runs["nobase"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout.replace("\n", "") and out.is_file()
    proc = kdistill(str(tmp_path / "cli"))  # a directory, but not a run's
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {tmp_path / 'cli'}: missing config.yaml")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((p for p in map(shutil.which, names) if p), None)


# Decided at collection, so a machine without Chromium does not train the runs fixture for it.
@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (scripts/setup.sh installs "
                    "Debian's `chromium` as root)")
def test_report_renders_in_headless_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    """A real browser lays the page out and decodes the embedded PNGs: the screenshot shows
    the plots' colours (the distilled student's orange), not a blank or broken page."""
    binary = _chromium()
    assert binary is not None
    page = write_html_report([runs["full"]], tmp_path / "report.html")
    shot = tmp_path / "report.png"
    subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,3000", page.as_uri()],
                   capture_output=True, timeout=180, check=True)
    assert shot.is_file() and shot.stat().st_size > 10_000

    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]  # RGB floats in [0, 1]
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05  # not one flat colour
    assert (pixels.mean(axis=2) < 0.5).mean() > 0.002  # dark text and axes
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    orange = (r > 0.85) & (g > 0.35) & (g < 0.65) & (b < 0.25)  # #ff7f0e, the student
    assert orange.sum() > 500  # the plots were decoded and drawn
