"""Translation data: catalog reading, normalisation, splits by message, BPE, packing."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from kdistill.data.translation import (
    BOS,
    EOS,
    IGNORE_INDEX,
    LOCALE_DIR,
    PAD,
    TextCodec,
    normalise,
    pack,
    read_pairs,
    replace_targets,
    translation_splits,
)
from kdistill.errors import ConfigError
from kdistill.losses import shift_labels


def write_mo(path: Path, entries: dict[str, str]) -> None:
    """A GNU .mo file (little-endian, no hash table) holding `entries` (msgid -> msgstr)."""
    keys = sorted(entries)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(entries[k].encode() + b"\0" for k in keys)
    n = len(keys)
    start = 28 + 16 * n  # header, then the two tables of (length, offset)
    o_tab, t_tab, offset = [], [], start
    for k in keys:
        o_tab += [len(k.encode()), offset]
        offset += len(k.encode()) + 1
    for k in keys:
        t_tab += [len(entries[k].encode()), offset]
        offset += len(entries[k].encode()) + 1
    head = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + struct.pack(f"<{4 * n}I", *o_tab, *t_tab) + ids + strs)


HEADER = {"": "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; "
              "plural=(n != 1);\n"}


def synthetic_pairs(n: int = 300) -> list[tuple[str, str]]:
    """Deterministic English/German-like message pairs (unique sources)."""
    verbs = [("open", "öffnen"), ("close", "schließen"), ("save", "speichern"),
             ("delete", "löschen"), ("copy", "kopieren"), ("move", "verschieben")]
    nouns = [("file", "Datei"), ("folder", "Ordner"), ("window", "Fenster"),
             ("image", "Bild"), ("message", "Nachricht")]
    adjectives = [("new", "neue"), ("old", "alte"), ("big", "große"), ("small", "kleine"),
                  ("red", "rote"), ("blue", "blaue"), ("last", "letzte"), ("first", "erste"),
                  ("hidden", "versteckte"), ("shared", "geteilte")]
    pairs = []
    for i in range(n):
        (ve, vd), (ne, nd) = verbs[i % 6], nouns[(i // 6) % 5]
        ae, ad = adjectives[(i // 30) % 10]
        pairs.append((f"Cannot {ve} the {ae} {ne}", f"Die {ad} {nd} kann nicht {vd} werden"))
    return pairs


def test_normalise_strips_accelerators_and_whitespace() -> None:
    assert normalise("_File") == "File"
    assert normalise("&Open recent") == "Open recent"
    assert normalise("Save && Quit") == "Save & Quit"
    assert normalise("keep snake_case and a&b") == "keep snake_case and a&b"
    # Only at a word start: a mid-word marker (GTK's "ö_ffnen") is kept, like identifiers.
    assert normalise("ö_ffnen") == "ö_ffnen"
    assert normalise("  usage:\n\t  prog  [OPTION]\n") == "usage: prog [OPTION]"


def test_catalogs_skip_header_plural_context_and_first_catalog_wins(tmp_path: Path) -> None:
    write_mo(tmp_path / "de" / "LC_MESSAGES" / "a.mo", {
        **HEADER, "_Open file": "Datei _öffnen", "%d file\0%d files": "%d Datei\0%d Dateien",
        "menu\x04Open": "Öffnen (Menü)", "%s: %d": "%s: %d", "GNOME": "GNOME",
        "Line one\n  line two": "Zeile eins\n  Zeile zwei"})
    write_mo(tmp_path / "de" / "LC_MESSAGES" / "b.mo",
             {**HEADER, "Open file": "Anderes Öffnen", "Quit": "Beenden"})
    pairs = read_pairs("gettext_en_de", root=tmp_path)
    assert sorted(pairs) == sorted([("Open file", "Datei öffnen"), ("Quit", "Beenden"),
                                    ("Line one line two", "Zeile eins Zeile zwei")])


def test_missing_catalogs_name_the_language_and_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.name: no gettext catalogs for language 'fr'"):
        read_pairs("gettext_en_fr", root=tmp_path)
    with pytest.raises(ConfigError, match="unknown translation data 'gettext_en_xx'"):
        read_pairs("gettext_en_xx", root=tmp_path)


def _splits(seed: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    args = {"seq_len": 12, "vocab_size": 300, "val_size": 30, "test_size": 0.1,
            "split_seed": seed, "pairs": synthetic_pairs(), **kw}
    return translation_splits("gettext_en_de", **args)  # type: ignore[arg-type]


def test_splits_are_disjoint_by_message_packed_and_deterministic() -> None:
    s = _splits()
    codec = TextCodec(s.tokenizer_json)
    sources = {name: {codec.decode(r) for r in x[:, 0]} for name, x in
               (("train", s.train_x), ("val", s.val_x), ("test", s.test_x))}
    assert sources["train"].isdisjoint(sources["val"]) and sources["train"].isdisjoint(
        sources["test"]) and sources["val"].isdisjoint(sources["test"])
    assert len(s.train_x) + len(s.val_x) + len(s.test_x) == 300
    assert s.task == "seq2seq" and s.input_shape == (2, 12) and s.train_x.dtype == torch.int64
    # Decoder rows: BOS first, one EOS, PAD after; labels = that row, -100 at BOS and padding.
    dec, y = s.train_x[:, 1], s.train_y
    assert (dec[:, 0] == BOS).all() and ((dec == EOS).sum(1) == 1).all()
    assert ((y == IGNORE_INDEX) == ((dec == PAD) | (torch.arange(12) == 0))).all()
    assert torch.equal(y[y != IGNORE_INDEX], dec[y != IGNORE_INDEX])
    # Position t predicts label t + 1 (the causal-LM convention, `shift_labels`).
    shifted = shift_labels(y)
    assert torch.equal(shifted[:, 0], dec[:, 1])
    assert ((s.train_x[:, 0] == EOS).sum(1) == 1).all()
    # The references are the raw test targets; ids decode back to the text.
    assert len(s.references) == len(s.test_x)
    assert [codec.decode(r[1, 1:]) for r in s.test_x] == list(s.references)
    again = _splits()
    assert again.fingerprint == s.fingerprint and again.tokenizer_json == s.tokenizer_json
    assert torch.equal(again.train_x, s.train_x)
    assert _splits(seed=1).fingerprint != s.fingerprint


def test_tokenizer_is_trained_on_the_training_split_only() -> None:
    # 'q' occurs in one pair only: the BPE alphabet has it exactly when that pair is in train.
    pairs = [*synthetic_pairs(), ("Zebra quagga okapi", "Zebra Quagga Okapi")]
    seen = set()
    for seed in range(12):
        s = translation_splits("gettext_en_de", seq_len=12, vocab_size=300, val_size=30,
                               test_size=0.1, split_seed=seed, pairs=pairs)
        codec = TextCodec(s.tokenizer_json)
        in_train = any(codec.decode(r).startswith("Zebra") for r in s.train_x[:, 0])
        has_q = any("q" in token.lower() for token in codec._tok.get_vocab())
        assert in_train == has_q
        seen.add(in_train)
    assert seen == {True, False}


def test_length_filter_and_bad_sizes() -> None:
    s = _splits(seq_len=14, vocab_size=120)  # a small BPE: long words take many tokens
    codec = TextCodec(s.tokenizer_json)
    fits = [max(len(codec.encode(a)), len(codec.encode(b))) <= 12 for a, b in synthetic_pairs()]
    assert 0 < sum(fits) < 300
    assert len(s.train_x) + len(s.val_x) + len(s.test_x) == sum(fits)
    assert ((s.train_x[:, 1] != PAD).sum(1) <= 14).all()
    with pytest.raises(ConfigError, match=r"data\.val_size"):
        _splits(val_size=10_000)
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        _splits(seq_len=3)
    with pytest.raises(ConfigError, match=r"data\.seq_len: 0 message pair"):
        _splits(seq_len=6)


def test_replace_targets_keeps_sources_and_relabels() -> None:
    s = _splits()
    new = [[7, 8, 9]] * len(s.train_x)
    out = replace_targets(s, new, "f")
    assert torch.equal(out.train_x[:, 0], s.train_x[:, 0]) and out.fingerprint == "f"
    assert out.train_x[0, 1, :5].tolist() == [BOS, 7, 8, 9, EOS]
    assert out.train_y[0, :5].tolist() == [IGNORE_INDEX, 7, 8, 9, EOS]
    assert torch.equal(out.test_x, s.test_x)


def test_pack_layout() -> None:
    x, y = pack([[5, 6]], [[7]], 5)
    assert x.tolist() == [[[5, 6, EOS, PAD, PAD], [BOS, 7, EOS, PAD, PAD]]]
    assert y.tolist() == [[IGNORE_INDEX, 7, EOS, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.skipif(not any((LOCALE_DIR / "de" / "LC_MESSAGES").glob("*.mo")),
                    reason="no German gettext catalogs on this machine")
def test_real_catalogs_give_thousands_of_pairs() -> None:
    pairs = read_pairs("gettext_en_de")
    assert len(pairs) > 5000
    assert len({s for s, _ in pairs}) == len(pairs)


def test_settings_translation_data_does_not_use_are_refused() -> None:
    from kdistill.config import data_source, load_config

    with pytest.raises(ConfigError, match=r"^data.tokenizer: unknown key"):
        data_source(name="gettext_en_de", tokenizer="smollm2")
    pairs = 'method.pairs=[["a", "b"]]'
    load_config(None, ["data.name=gettext_en_de", "method.name=cross_attn", pairs,
                       "student.model.arch=seq2seq_transformer"])  # seq2seq data: fine
    with pytest.raises(ConfigError, match="'cross_attn' is for seq2seq data"):
        load_config(None, ["method.name=cross_attn", pairs])
