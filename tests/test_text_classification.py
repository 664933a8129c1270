"""Fortune-category text classification: data, padded batches, models, losses, teacher cache.

Tiny data: a fake fortunes directory with the five categories of `fortunes5`; the real
all-MiniLM-L6-v2 tokenizer (local, loads in ~0.1 s); tiny random BERT encoders saved to a
temporary directory stand in for the 90 MB teacher.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.capture import capture
from kdistill.data import fortune_classes
from kdistill.data import text as text_data
from kdistill.data.fortune_classes import FIVE_CATEGORIES, fortune_splits, tokenize_padded
from kdistill.errors import ConfigError, MissingDependencyError
from kdistill.models import build_model
from kdistill.models.hf import load_tokenizer
from kdistill.models.text import _pretrained_encoder

WORDS = {
    "computers": "computer program bug software disk memory unix kernel code compiler",
    "people": "friend mother man woman child love life family neighbour wife",
    "science": "physics atom energy theory experiment chemistry universe light mass",
    "politics": "government vote senator president law election party tax congress",
    "work": "job boss office meeting salary manager employee career overtime desk",
}
SHARED = "This exact sentence sits in two category files at once."


def _write_fortunes(directory: Path, per_class: int = 12) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for c, words in WORDS.items():
        w = words.split()
        entries = [" ".join(w[(i + k) % len(w)] for k in range(4 + i % 9)) + f" number {i}."
                   for i in range(per_class)]
        entries += ["too short", entries[0]]  # dropped (< 20 chars), kept once (a repeat)
        if c in ("people", "work"):
            entries.append(SHARED)  # in two categories: dropped from both
        (directory / c).write_text("\n%\n".join(entries) + "\n%\n")
        (directory / f"{c}.dat").write_bytes(b"\x00\x01")  # index files are not categories
    return directory


@pytest.fixture
def fortunes_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = _write_fortunes(tmp_path / "fortunes")
    monkeypatch.setattr(text_data, "FORTUNES_DIR", directory)
    fortune_classes._categories.cache_clear()
    return directory


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_tokenizer("minilm")


def _tiny_bert(directory: Path, layers: int = 2, vocab: int = 30522) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(directory)
    _pretrained_encoder.cache_clear()
    return str(directory)


# --- data: reading, tokenisation, splits ---------------------------------------------------


def test_categories_drop_short_texts_repeats_and_texts_in_two_categories(fortunes_dir: Path
                                                                         ) -> None:
    cats = fortune_classes.fortune_categories("fortunes5")
    assert list(cats) == list(FIVE_CATEGORIES)  # class k is the k-th of the task's categories
    assert all(len(texts) == 12 for texts in cats.values())
    assert not any(SHARED in texts for texts in cats.values())
    assert fortune_classes.fortune_categories("fortunes43").keys() == set(WORDS)


def test_tokenisation_is_cls_text_sep_padded_with_the_pad_id(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenize_padded(["a short text", "word " * 50], tokenizer, 12)
    assert ids.shape == (2, 12) and ids.dtype == torch.int64
    assert ids[:, 0].tolist() == [tokenizer.cls_token_id] * 2
    n = len(tokenizer("a short text")["input_ids"])
    assert ids[0, n - 1] == tokenizer.sep_token_id and (ids[0, n:] == tokenizer.pad_token_id).all()
    assert ids[1, -1] == tokenizer.sep_token_id  # truncated, still closed by [SEP]
    assert (ids[1] != tokenizer.pad_token_id).all()


def test_splits_are_stratified_disjoint_and_fixed_by_the_seed(fortunes_dir: Path, tokenizer
                                                              ) -> None:  # type: ignore[no-untyped-def]
    s = fortune_splits("fortunes5", tokenizer, seq_len=16, val_size=0.2, test_size=10,
                       split_seed=0)
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (38, 12, 10)
    assert s.num_classes == 5 and s.input_shape == (16,) and s.task == "classification"
    assert torch.bincount(s.test_y, minlength=5).tolist() == [2] * 5
    assert set(torch.bincount(s.val_y, minlength=5).tolist()) <= {2, 3}  # 12 over 5 classes
    rows = {tuple(r) for x in (s.train_x, s.val_x, s.test_x) for r in x.tolist()}
    assert len(rows) == 60  # every text in exactly one split
    again = fortune_splits("fortunes5", tokenizer, seq_len=16, val_size=0.2, test_size=10,
                           split_seed=0)
    assert again.fingerprint == s.fingerprint and torch.equal(again.test_x, s.test_x)
    other = fortune_splits("fortunes5", tokenizer, seq_len=16, val_size=0.2, test_size=10,
                           split_seed=1)
    assert other.fingerprint != s.fingerprint and not torch.equal(other.test_x, s.test_x)


def test_missing_package_names_the_apt_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               tokenizer) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(text_data, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(MissingDependencyError, match=r"apt-get install.*fortunes") as err:
        fortune_splits("fortunes5", tokenizer, seq_len=16, val_size=0.2, test_size=0.2,
                       split_seed=0)
    assert err.value.where == "data.name"


def test_build_data_needs_a_tokenizer_and_refuses_token_limits(fortunes_dir: Path) -> None:
    from kdistill.build import build_data
    from kdistill.config import data_source

    with pytest.raises(ConfigError, match=r"^data.tokenizer: Field required"):
        data_source(name="fortunes5")
    with pytest.raises(ConfigError, match=r"^data.max_train_tokens: unknown key"):
        data_source(name="fortunes5", tokenizer="minilm", max_train_tokens=100)
    with pytest.raises(ConfigError, match=r"data.val_size"):
        build_data(data_source(name="fortunes5", tokenizer="minilm", val_size=30, test_size=0.5))
    s = build_data(data_source(name="fortunes5", tokenizer="minilm", seq_len=16, val_size=10))
    assert s.train_x.shape[1] == 16


# --- models: padding masks, layer maps, hookable layers ------------------------------------


def _padded(tokenizer, texts: list[str], length: int):  # type: ignore[no-untyped-def]
    return tokenize_padded(texts, tokenizer, length)


@pytest.mark.parametrize("project_dim", [None, 6])
def test_textcnn_ignores_padding(tokenizer, project_dim: int | None) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model("textcnn", input_shape=(16,), num_classes=3,
                        args={"vocab_size": len(tokenizer), "pad_id": 0, "embed_dim": 8,
                              "channels": 4, "project_dim": project_dim}).eval()
    with torch.no_grad():
        model.embed.weight[0] = 1.0  # a pad row that is not zero must still not count
    texts = ["hi", "a somewhat longer text about computers and their bugs"]
    short, long = _padded(tokenizer, texts, 16), _padded(tokenizer, texts, 40)
    text = texts[1]
    exact = _padded(tokenizer, [text], len(tokenizer(text)["input_ids"]))  # no padding at all
    assert (exact != 0).all()
    with torch.no_grad():
        torch.testing.assert_close(model(short), model(long))
        torch.testing.assert_close(model(exact), model(long[1:]))
        # Windows that start in the padding must not win the max-pool: make every real window
        # respond below what an all-padding window gives (the bias).
        model.embed.weight.abs_()
        if model.project is not None:
            model.project.weight.abs_()
        for conv in model.convs:
            conv.weight.fill_(-0.1)
            conv.bias.fill_(1.0)
        torch.testing.assert_close(model(exact), model(long[1:]))
    width = project_dim or 8
    assert sum(p.numel() for p in model.parameters()) == (
        len(tokenizer) * 8 + 8 * (project_dim or 0) + sum(width * 4 * w + 4 for w in (3, 4, 5))
        + 12 * 3 + 3)
    with pytest.raises(TypeError, match="token ids"):
        model(short.float())


def test_encoder_masks_padding_and_exposes_layers(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = _tiny_bert(tmp_path / "bert")
    model = build_model("hf_encoder_classifier", input_shape=(16,), num_classes=3,
                        args={"path": path}).eval()
    texts = ["hi there", "a somewhat longer text about computers and their bugs"]
    short, long = _padded(tokenizer, texts, 16), _padded(tokenizer, texts, 40)
    names = ["bert.encoder.layer.1.attention.self[1]", "tokens.0", "tokens.2"]
    with torch.no_grad(), capture(model, names) as feats:
        out_short = model(short)
        att = feats[names[0]]
        assert att.shape == (2, 4, 16, 16) and feats["tokens.2"].shape == (2, 32, 16)
        out_long = model(long)
    torch.testing.assert_close(out_short, out_long, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 16))
    n_real = int((short[0] != 0).sum())
    assert float(att[0, :, :, n_real:].abs().max()) == 0.0  # padded keys get no attention
    assert not any(k.startswith("bert.pooler") for k in model.state_dict())


def test_student_copies_the_mapped_layers(tmp_path: Path) -> None:
    path = _tiny_bert(tmp_path / "bert", layers=4, vocab=100)
    teacher = build_model("hf_encoder_classifier", input_shape=(8,), num_classes=2,
                          args={"path": path})
    student = build_model("hf_encoder_student", input_shape=(8,), num_classes=2,
                          args={"init_from": path, "layers": 2})  # default map: [1, 3]
    t, s = teacher.state_dict(), student.state_dict()
    for m, src in enumerate([1, 3]):
        key = "bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(s[key.format(m)], t[key.format(src)])
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"],
                       t["bert.embeddings.word_embeddings.weight"])
    assert student.bert.config.attention_probs_dropout_prob == 0.0
    mapped = build_model("hf_encoder_student", input_shape=(8,), num_classes=2,
                         args={"init_from": path, "layers": 2, "layer_map": [0, 0]})
    assert torch.equal(mapped.state_dict()["bert.encoder.layer.1.output.dense.weight"],
                       t["bert.encoder.layer.0.output.dense.weight"])
    with pytest.raises(ConfigError, match=r"args.layer_map"):
        build_model("hf_encoder_student", input_shape=(8,), num_classes=2,
                    args={"init_from": path, "layers": 2, "layer_map": [0, 4]}, where="student")
    random = build_model("hf_encoder_student", input_shape=(8,), num_classes=2,
                         args={"init_from": path, "layers": 2, "random_init": True})
    assert not torch.equal(random.state_dict()["bert.encoder.layer.0.output.dense.weight"],
                           t["bert.encoder.layer.1.output.dense.weight"])
    cnn = build_model("textcnn", input_shape=(8,), num_classes=2,
                      args={"vocab_size": 100, "pad_id": 0, "embed_dim": 32,
                            "init_embeddings": path})
    assert torch.equal(cnn.embed.weight, t["bert.embeddings.word_embeddings.weight"])
    _check_principal_projection(path, t["bert.embeddings.word_embeddings.weight"])
    with pytest.raises(ConfigError, match=r"args\.init_embeddings"):
        build_model("textcnn", input_shape=(8,), num_classes=2,
                    args={"vocab_size": 100, "pad_id": 0, "embed_dim": 16,
                          "init_embeddings": path})
    with pytest.raises(ConfigError, match="token ids"):
        build_model("textcnn", input_shape=(1, 8, 8), num_classes=2,
                    args={"vocab_size": 10, "pad_id": 0})


def _check_principal_projection(path: str, table: torch.Tensor) -> None:
    """`project_dim: k` starts as the table's top k principal directions (pad row left out):
    orthonormal rows that keep more of the rows' variance than any other k directions."""
    cnn = build_model("textcnn", input_shape=(8,), num_classes=2,
                      args={"vocab_size": 100, "pad_id": 0, "embed_dim": 32, "project_dim": 4,
                            "init_embeddings": path})
    w = cnn.project.weight.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    rows = table[1:].double() - table[1:].double().mean(dim=0)
    top = torch.linalg.eigvalsh(rows.T @ rows).flip(0)[:4]
    assert torch.allclose((rows @ w.T).pow(2).sum(dim=0), top, rtol=1e-4)
    ids = torch.tensor([[5, 6, 0, 0]])
    assert cnn(ids).shape == (1, 2)
    with pytest.raises(ConfigError, match=r"args\.project_dim"):
        build_model("textcnn", input_shape=(8,), num_classes=2,
                    args={"vocab_size": 100, "pad_id": 0, "embed_dim": 32, "project_dim": 33})


TEXT_RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("text-*.yaml"))


@pytest.mark.parametrize("recipe", TEXT_RECIPES, ids=[p.stem for p in TEXT_RECIPES])
def test_text_recipes_build_with_the_real_minilm(recipe: Path) -> None:
    from kdistill.build import validate
    from kdistill.config import load_config

    assert len(recipe.read_text().splitlines()) < 40
    splits = validate(load_config(recipe))  # adapters and attention pairs probed too
    assert splits.num_classes == 5 and splits.input_shape == (64,)
