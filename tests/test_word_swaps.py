"""Tang et al.'s same-class word swaps (issue #17, scope 1) with word classes induced from the
transfer set's own text (Schütze 1995): the classes follow the neighbours, a swap keeps the
class and the frame, draws by frequency, never meets a masked token, and the teacher's cached
views are the students' live ones (the student alone swaps within the same classes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill import pipeline
from kdistill.build import build_train_loader
from kdistill.config import RunConfig, TrainSettings, load_config
from kdistill.config.schema import RunTransferSet
from kdistill.data.transfer import ViewRows, make_views, swap_tokens
from kdistill.data.word_classes import MIN_COUNT, build_word_classes
from kdistill.errors import ConfigError
from kdistill.pipeline import teaching
from kdistill.types import DataSplits
from tests.test_text_classification import _tiny_bert, fortunes_dir  # noqa: F401 - fixture
from tests.test_text_transfer import CLS, MASK, PAD, RECIPE, ROLES, _row, _splits

NOUNS, VERBS, DETS = range(200, 206), range(300, 306), (400, 401)


def _corpus(n: int = 600, seed: int = 0) -> torch.Tensor:
    """Texts "det noun verb det noun": nouns and verbs never share a neighbour pattern."""
    g = torch.Generator().manual_seed(seed)

    def pick(group: range | tuple[int, ...]) -> int:
        return group[int(torch.randint(len(group), (1,), generator=g))]

    return torch.tensor([_row(pick(DETS), pick(NOUNS), pick(VERBS), pick(DETS), pick(NOUNS))
                         for _ in range(n)])


def test_classes_follow_the_neighbours_and_leave_the_frame_out() -> None:
    classes = build_word_classes(_corpus(), ROLES, num_classes=3, seed=0)
    noun = {int(classes.label[t]) for t in NOUNS}
    verb = {int(classes.label[t]) for t in VERBS}
    det = {int(classes.label[t]) for t in DETS}
    assert len(noun) == len(verb) == len(det) == 1 and len(noun | verb | det) == 3
    for t in (CLS, PAD, MASK, 102):
        assert classes.label[t] == -1
    again = build_word_classes(_corpus(), ROLES, num_classes=3, seed=0)
    assert torch.equal(classes.label, again.label)  # a pure function of text and seed


def test_rare_tokens_have_no_class_and_too_many_classes_are_refused() -> None:
    x = torch.cat([_corpus(), torch.tensor([_row(999, 200, 300)] * (MIN_COUNT - 1))])
    classes = build_word_classes(x, ROLES, num_classes=3, seed=0)
    assert classes.label[999] == -1
    assert classes.sample(torch.tensor([999]), torch.tensor([0.5])).item() == 999
    with pytest.raises(ConfigError, match=r"transfer_set\.swap_classes"):
        build_word_classes(_corpus(), ROLES, num_classes=50, seed=0)


def test_swaps_keep_the_class_and_the_frame_and_draw_other_tokens_by_frequency() -> None:
    x = _corpus(3000)
    x[:1500, 2] = NOUNS[0]  # the first noun is now four times as frequent as each other noun
    classes = build_word_classes(x, ROLES, num_classes=3, seed=0)
    g = torch.Generator().manual_seed(1)
    u, v = torch.rand(x.shape, generator=g), torch.rand(x.shape, generator=g)
    out = swap_tokens(x, u, 0.1, 0.6, v, classes, ROLES)
    special = torch.isin(x, torch.tensor(ROLES.special))
    assert torch.equal(out[special], x[special])
    band = (u >= 0.1) & (u < 0.6)
    assert torch.equal(out[~band], x[~band])
    assert (out[band & ~special] != x[band & ~special]).all()  # a swap never keeps the token
    assert torch.equal(classes.label[out[~special]], classes.label[x[~special]])
    # From the last noun: the other five in proportion to their counts (the first has 4x).
    drawn = out[band & (x == NOUNS[-1])]
    counts = torch.bincount(x[torch.isin(x, torch.tensor(NOUNS[:-1]))], minlength=206)[200:205]
    share = torch.bincount(drawn, minlength=206)[200:205].double() / len(drawn)
    assert len(drawn) > 300
    assert torch.allclose(share, counts.double() / counts.sum(), atol=0.06)


def test_a_token_alone_in_its_class_stays() -> None:
    x = torch.cat([_corpus(), torch.tensor([_row(500, 500, 500)] * 20)])
    classes = build_word_classes(x, ROLES, num_classes=4, seed=0)
    alone = int(classes.label[500])
    assert (classes.label == alone).sum() == 1
    assert classes.sample(torch.tensor([500, 500]), torch.tensor([0.0, 0.999])).tolist() == [
        500, 500]


def test_masking_and_swapping_share_one_draw_per_token() -> None:
    splits = DataSplits(**{**_splits().__dict__, "train_x": _corpus(60), "train_y":
                           torch.arange(60) % 3})
    both = make_views(splits, RunTransferSet(views=4, mask_prob=0.3, swap_prob=0.5, swap_classes=3),
                      unlabelled=False)
    masked = make_views(splits, RunTransferSet(views=4, mask_prob=0.3), unlabelled=False)
    i, k = torch.arange(60).repeat(4), torch.arange(4).repeat_interleave(60)
    a, b = both.inputs(i, k), masked.inputs(i, k)
    assert torch.equal(a == MASK, b == MASK)  # swaps leave the masking as it was
    content = ~torch.isin(splits.train_x[i], torch.tensor(ROLES.special))
    changed = (a != splits.train_x[i]) & (a != MASK) & content
    assert changed.sum() / content.sum() == pytest.approx(0.5, abs=0.05)  # 50 % swapped


def test_the_cache_rows_are_the_live_views_for_every_student() -> None:
    extra = _corpus(40, seed=3)
    base = _splits()
    splits = DataSplits(**{**base.__dict__, "train_x": _corpus(60), "train_y":
                           torch.arange(60) % 3, "unlabelled_x": extra})
    ts = RunTransferSet(views=3, swap_prob=0.3, swap_classes=3)
    cfg = RunConfig(data={"name": "digits"}, transfer_set=ts)
    rows, k, _ = teaching.cache_inputs(cfg, splits)
    for unlabelled in (False, True):
        loader = build_train_loader(splits, TrainSettings(batch_size=16), seed=0, where="t",
                                    transfer_set=ts, unlabelled=unlabelled)
        batch = next(iter(loader.epoch(1)))
        assert torch.equal(batch["input"], rows[batch["index"] * k + batch["view"]])
    assert isinstance(rows, ViewRows)


@pytest.mark.parametrize(("transfer_set", "message"), [
    ({"swap_classes": 8, "mask_prob": 0.1}, "swap_classes: used only with swap_prob"),
    ({"swap_prob": 0.5, "mask_prob": 0.5}, r"mask_prob \+ swap_prob"),
    ({"swap_prob": 0.2, "jitter": 1}, "one input holds one kind"),
])
def test_swap_settings_are_checked(transfer_set: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(data={"name": "digits"}, transfer_set=transfer_set)


def test_too_many_classes_stop_a_run_before_its_teacher_trains(
        tmp_path: Path, fortunes_dir: Path) -> None:  # noqa: F811
    art = [f"paint brush canvas colour gallery number {i}." for i in range(7)]
    (fortunes_dir / "art").write_text("\n%\n".join(art) + "\n%\n")  # the unlabelled texts
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert=_tiny_bert(tmp_path / "b"))
                      .replace("swap_classes: 4", "swap_classes: 100000"))
    with pytest.raises(ConfigError, match=r"^transfer_set\.swap_classes: only \d+ tokens"):
        pipeline.run(load_config(recipe), echo=lambda _: None)
    assert not list((tmp_path / "runs").glob("*/teacher"))


def test_the_student_alone_retrains_when_the_texts_its_classes_come_from_change() -> None:
    from kdistill.methods import build_method
    from kdistill.methods.ce import CEConfig
    from kdistill.pipeline.stages import student_fingerprint

    base = DataSplits(**{**_splits().__dict__, "train_x": _corpus(60),
                         "train_y": torch.arange(60) % 3})
    other = DataSplits(**{**base.__dict__, "unlabelled_x": _corpus(40, seed=3)})
    ce = build_method(CEConfig())

    def alone(splits: DataSplits, **views: float) -> str:
        cfg = RunConfig(data={"name": "digits"}, transfer_set={"views": 2, **views})
        return student_fingerprint("baseline", cfg, splits, 0, ce, None, None)

    assert alone(base, swap_prob=0.2, swap_classes=3) != alone(other, swap_prob=0.2,
                                                               swap_classes=3)
    assert alone(base, mask_prob=0.2) == alone(other, mask_prob=0.2)  # never sees them
