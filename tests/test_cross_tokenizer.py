"""Cross-tokenizer logit distillation (`arch: projected_lm`), `kdistill tokenizer` and bits per
byte, on real docstrings with tiny byte-level BPEs and tiny models."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill import load_config, run
from kdistill.errors import ConfigError

pytest.importorskip("transformers")

TEXT = "Return the number of bytes in übermäßig buffers — 3.5 €.\n\nRaise ValueError if not."


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two byte-level BPEs learned on real docstrings: a 700-token 'teacher' and a 300-token
    'student' vocabulary, and a tiny Llama over the teacher's, saved like a HF model."""
    from kdistill.data.bpe import train_bpe
    from kdistill.data.text import read_corpus
    from kdistill.models import build_model

    docs = read_corpus("stdlib_docs")[:400]
    root = tmp_path_factory.mktemp("xtok")
    teacher_tok = train_bpe(docs, 700, root / "teacher")
    train_bpe(docs, 300, root / "student")
    model = build_model("llama", input_shape=(32,), num_classes=len(teacher_tok),
                        args={"hidden": 32, "layers": 1, "heads": 2})
    model.model.save_pretrained(root / "teacher")
    return {"teacher": root / "teacher", "student": root / "student"}


def _projection(toks: dict[str, Path], student: str = "student"):  # type: ignore[no-untyped-def]
    from kdistill.models.cross_tokenizer import Projection
    from kdistill.models.hf import load_tokenizer

    return Projection(load_tokenizer(str(toks["teacher"])), load_tokenizer(str(toks[student])))


def test_token_bytes_rebuild_the_text_exactly(toks: dict[str, Path]) -> None:
    from kdistill.models.cross_tokenizer import token_byte_lengths, token_bytes
    from kdistill.models.hf import load_tokenizer

    for name in ("teacher", "student"):
        tok = load_tokenizer(str(toks[name]))
        table = token_bytes(tok)
        ids = tok(TEXT, add_special_tokens=False).input_ids
        assert b"".join(table[i] for i in ids) == TEXT.encode()  # partial UTF-8 tokens too
        assert table[tok.eos_token_id] is None
        assert int(token_byte_lengths(tok)[ids].sum()) == len(TEXT.encode())


def test_one_tokenizer_projects_to_the_teachers_own_top_k(toks: dict[str, Path]) -> None:
    from kdistill.losses import token_distill_loss
    from kdistill.models.cross_tokenizer import ProjectedLM
    from kdistill.models.hf import load_tokenizer

    proj = _projection(toks, student="teacher")
    tok = load_tokenizer(str(toks["teacher"]))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Embedding(len(tok), 16), nn.Linear(16, len(tok)))
    ids = torch.tensor([tok(TEXT, add_special_tokens=False).input_ids[:24]] * 2)
    want = torch.log_softmax(teacher(ids), -1)
    full = ProjectedLM(teacher, proj, candidates=len(tok))(ids)
    assert torch.allclose(full, want, atol=1e-4)  # every position, the last one included
    top = ProjectedLM(teacher, proj, candidates=5)
    out = top(ids).exp()
    assert top.fallbacks == 0
    values, indices = want.topk(5, dim=-1)
    renorm = values.exp() / values.exp().sum(-1, keepdim=True)
    assert torch.allclose(out.gather(-1, indices), renorm, atol=1e-4)
    # The student equal to the teacher mapped across: zero KD loss, finite gradients.
    student = full.clone().requires_grad_(True)
    res = token_distill_loss(student, full, ids, alpha=1.0, kind="forward_kl")
    res.loss.backward()
    assert abs(float(res.kd.detach())) < 1e-5 and torch.isfinite(student.grad).all()


def test_two_tokenizers_an_oracle_teacher_lands_on_the_observed_student_tokens(
        toks: dict[str, Path]) -> None:
    from kdistill.data.text import read_corpus
    from kdistill.models.cross_tokenizer import OracleLM, ProjectedLM
    from kdistill.models.hf import load_tokenizer

    proj = _projection(toks)
    student_tok = load_tokenizer(str(toks["student"]))
    stream: list[int] = []
    for doc in read_corpus("stdlib_docs")[500:530]:  # unseen by either BPE
        stream += [*student_tok(doc, add_special_tokens=False).input_ids, student_tok.eos_token_id]
    ids = torch.tensor(stream[1 : 1 + 4 * 64]).view(4, 64)  # blocks start mid-token
    model = ProjectedLM(OracleLM(len(proj.teacher_bytes)), proj, candidates=4)
    q = model(ids).exp()
    assert torch.allclose(q.sum(-1), torch.ones(4, 64), atol=1e-4)
    observed = q[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert bool((observed > 0.99).all())  # oracle mass, or the fallback to the observed token
    assert model.fallbacks < 0.25 * model.positions  # the projection holds almost everywhere
    # Documents end where both tokenizations end: EOS maps to EOS.
    eos = (ids[:, 1:] == student_tok.eos_token_id).nonzero()
    assert len(eos) > 0 and bool((q[eos[:, 0], eos[:, 1], student_tok.eos_token_id] > 0.99).all())
    # Zero mass stays zero at any temperature: a one-hot target is one-hot at T = 4 too.
    tempered = torch.softmax(model(ids)[:, :-1] / 4, dim=-1)
    assert bool((tempered.gather(-1, ids[:, 1:, None]) > 0.99).all())


def test_the_cache_key_follows_the_projection(toks: dict[str, Path]) -> None:
    from kdistill.cache_key import fingerprint_model
    from kdistill.models.cross_tokenizer import OracleLM, ProjectedLM

    teacher = OracleLM(700)
    prints = {fingerprint_model(ProjectedLM(teacher, _projection(toks, s), candidates=c))
              for s, c in (("student", 4), ("student", 8), ("teacher", 4))}
    assert len(prints) == 3


def test_word_level_tokenizers_get_no_bits_per_byte_and_no_projection(
        tmp_path: Path, toks: dict[str, Path]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdistill.models import build_model
    from kdistill.models.cross_tokenizer import token_byte_lengths
    from kdistill.models.hf import load_tokenizer
    from kdistill.tasks.causal_lm import lm_scores

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([TEXT] * 3, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "</s>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(tmp_path / "words")
    tok = load_tokenizer(str(tmp_path / "words"))
    assert token_byte_lengths(tok) is None  # "Return the" has bytes no token holds
    with pytest.raises(ConfigError, match=r"args.tokenizer: .*byte-level BPE"):
        build_model("projected_lm", input_shape=(8,), num_classes=len(tok),
                    args={"path": str(toks["teacher"]), "tokenizer": str(tmp_path / "words")})
    ids = torch.tensor([tok(TEXT).input_ids[:6]])
    model = nn.Sequential(nn.Embedding(len(tok), 2), nn.Linear(2, len(tok)))
    ignored = torch.full_like(ids, -100)
    assert math.isnan(lm_scores(model, ids, ignored)["perplexity"])  # nothing scored: no score


def test_bits_per_byte_of_a_uniform_model(toks: dict[str, Path]) -> None:
    from kdistill.models.cross_tokenizer import token_byte_lengths
    from kdistill.models.hf import load_tokenizer
    from kdistill.tasks.causal_lm import lm_scores

    tok = load_tokenizer(str(toks["student"]))
    ids = torch.tensor([tok(TEXT, add_special_tokens=False).input_ids[:20]])
    uniform = nn.Sequential(nn.Embedding(len(tok), 2), nn.Linear(2, len(tok)))
    nn.init.zeros_(uniform[1].weight)
    nn.init.zeros_(uniform[1].bias)
    lengths = token_byte_lengths(tok)
    scores = lm_scores(uniform, ids, ids, token_bytes=lengths)
    predicted_bytes = int(lengths[ids[0, 1:]].sum())
    assert scores["bits_per_byte"] == pytest.approx(math.log2(len(tok)) * 19 / predicted_bytes)


def _recipe(tmp_path: Path, toks: dict[str, Path], teacher: str) -> Path:
    path = tmp_path / "xtok.yaml"
    path.write_text(f"""\
name: xtok
output_dir: {tmp_path / 'runs'}
data: {{name: stdlib_docs, tokenizer: {toks['student']}, seq_len: 32, max_train_tokens: 2048,
        max_eval_tokens: 256}}
teacher: {{model: {teacher}}}
student: {{model: {{arch: llama, args: {{hidden: 16, layers: 1, heads: 2}}}}}}
method: {{name: token_kd, kind: forward_kl}}
cache: {{topk: 8}}
train: {{epochs: 1, batch_size: 16, optimizer: {{name: adam, lr: 0.01}}}}
eval: {{latency_repeats: 3, samples: 2, sample_tokens: 4}}
""")
    return path


def test_a_run_distils_across_tokenizers_from_the_cache(tmp_path: Path,
                                                         toks: dict[str, Path]) -> None:
    teacher = (f"{{arch: projected_lm, args: {{path: {toks['teacher']}, tokenizer: "
               f"{toks['student']}, candidates: 16}}}}")
    cfg = load_config(_recipe(tmp_path, toks, teacher))
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    assert any("top-8 log-probabilities" in line for line in lines)
    assert any(line.startswith("cache: projection: ") for line in lines)  # how often it held
    assert result.teacher_forwards == 0  # offline: every KD target came from the cache
    rows = result.rows
    for role in ("teacher", "baseline", "student"):
        assert 0 < rows[role][0]["bits_per_byte"] < 16
    # The teacher is scored on its own tokenization (its outputs read the next ids).
    assert "agreement" not in rows["teacher"][0] and "agreement" not in rows["student"][0]
    assert "bits/byte" in (cfg.run_dir / "report.md").read_text()


def test_recipe_checks_of_a_projected_teacher(tmp_path: Path, toks: dict[str, Path]) -> None:
    from kdistill.build import validate

    good = (f"{{arch: projected_lm, args: {{path: {toks['teacher']}, tokenizer: "
            f"{toks['student']}}}}}")
    recipe = _recipe(tmp_path, toks, good)
    with pytest.raises(ConfigError, match=r"teacher.model.args.tokenizer: .*another tokenizer"):
        validate(load_config(recipe, [f"teacher.model.args.tokenizer={toks['teacher']}"]))
    with pytest.raises(ConfigError, match=r"student.model.arch: projected_lm .*cannot be trained"):
        validate(load_config(recipe, [f"student.model={good}"]))
    with pytest.raises(ConfigError, match=r"teacher.train: a projected_lm teacher"):
        validate(load_config(recipe, ["teacher.train={epochs: 1}"]))
    with pytest.raises(ConfigError, match=r"on-policy method 'gkd'"):
        validate(load_config(recipe, ["method={name: gkd}", "cache.topk=null"]))
    with pytest.raises(ConfigError, match=r"args.candidates: .* 1 \.\. 1024, got True"):
        validate(load_config(recipe, ["teacher.model.args.candidates=true"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"args.tokenizer: no tokenizer could be read"):
        validate(load_config(recipe, [f"teacher.model.args.tokenizer={empty}"]))
    # A plain teacher over another vocabulary points to the projected one.
    with pytest.raises(ConfigError, match=r"teacher.model: .*arch: projected_lm"):
        validate(load_config(recipe, [f"teacher.model={{arch: hf_causal_lm, args: {{path: "
                                      f"{toks['teacher']}}}}}"]))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdistill", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_tokenizer_learns_on_the_training_documents_only(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("\n\n".join(["alphabetagamma delta"] * 50 + [TEXT] * 5))
    (tmp_path / "test.txt").write_text("\n\n".join(["zyxwvutsrq held out"] * 50))
    (tmp_path / "r.yaml").write_text(
        "data: {name: text_files, path: train.txt, test_path: test.txt, tokenizer: tok}\n"
        "teacher: {model: {arch: hf_causal_lm}}\n"
        "student: {model: {arch: llama}}\nmethod: {name: token_kd}\n")
    done = _cli("tokenizer", "r.yaml", "--vocab-size", "300", "--out", "tok", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from kdistill.models.hf import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "tok"))
    vocab = set(tok.get_vocab())
    assert len(tok) == 300 and any("alphabetagamma" in t for t in vocab)
    assert not any("zyx" in t for t in vocab)  # the test file never shaped the vocabulary
    (tmp_path / "file").write_text("x")
    for args, message in ((("--vocab-size", "100", "--out", "t2"), "--vocab-size: 257 (the"),
                          (("--vocab-size", "1" + "0" * 20, "--out", "t2"), "--vocab-size: 257"),
                          (("--vocab-size", "300", "--out", "file/sub"), "--out: cannot create"),
                          (("--vocab-size", "300", "--out", "tok"), "--out: tok exists"),
                          (("data.name=mnist", "--out", "t3"), "'mnist'")):
        bad = _cli("tokenizer", "r.yaml", *args, cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert message in bad.stderr and "Traceback" not in bad.stderr
