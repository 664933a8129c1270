"""The distillation stage's transfer set: K augmented views of every training input.

Beyer et al. 2022 ("Knowledge distillation: a good teacher is patient and consistent",
arXiv:2106.05237) distil on aggressively augmented inputs, and the teacher labels exactly the
view the student sees ("function matching"). Here a view is a pure function of
(`seed`, sample i, view k): random shifts of up to `jitter` pixels, a random mirror (`flip`),
then, with probability `mix_prob`, a mix with another training input j (itself shifted and
mirrored) drawn from the same key: mixup (Zhang et al. 2018, arXiv:1710.09412) or CutMix (Yun
et al. 2019, arXiv:1905.04899), the ratio λ ~ Beta(α, α). A view never depends on which other
samples share its batch, so the teacher's outputs on all N·K views can be cached once (row
i·K + k) and read back by (index, view), equal to what the teacher gives on the live view.

Every random number comes from a counter-based hash of its key (`uniform`), not from a
generator's state: views are reproducible, cheap to make for a whole batch at once, and the
cache a run builds today is the one it would build tomorrow. Views are made only from the
training split (partners too): validation and test inputs never enter the transfer set.

In epoch e sample i is shown view (e + o_i) mod K, o_i a per-sample offset drawn from the
student's seed: every view is seen equally often, in a different order per sample. With
`views: null` every epoch gets a fresh view (k = e) and the teacher runs online.

For the labels' loss a mixed view carries `label_b` (the partner's label) and `mix` (λ, the
weight of `label`): methods that accept mixed inputs score it as λ·CE(label) + (1 − λ)·
CE(label_b) (`kdistill.losses.mixed_cross_entropy`); the teacher's term needs nothing: its
target is the teacher's output on the mixed input itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

from kdistill.data.loader import BatchLoader, _generator
from kdistill.data.transfer_config import TransferSetConfig
from kdistill.data.word_classes import WordClasses, build_word_classes
from kdistill.types import IGNORE_INDEX, Batch, DataSplits, TokenRoles

_M32 = 0xFFFFFFFF
# Jöhnk's sampler accepts ≥ 1/2 of its draws for α ≤ 1 (≥ 1/6 up to α = 2): 16 (64) tries
# leave a row without an accepted draw with probability < 2e-5
_BETA_TRIES = {True: 16, False: 64}


# -- counter-based random numbers ----------------------------------------------------------------


def _mix32(x: Tensor) -> Tensor:
    """An avalanching 32-bit integer hash (xorshift-multiply rounds) on int64 lanes < 2^32;
    both multipliers are < 2^31, so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _M32
    return x ^ (x >> 16)


def uniform(seed: int, *keys: Tensor | int) -> Tensor:
    """Uniform numbers in (0, 1), float64, one per element of the broadcast `keys` (integer
    tensors or ints in [0, 2^32)), a pure function of (seed, keys)."""
    tensors = [k if isinstance(k, Tensor) else torch.tensor(k) for k in keys]
    h = torch.full(torch.broadcast_shapes(*(t.shape for t in tensors)), seed & _M32,
                   dtype=torch.int64)
    h = _mix32(h ^ (seed >> 32))
    for key in tensors:
        h = _mix32(h ^ (key.to(torch.int64) & _M32))
    return (h.double() + 0.5) / 2**32


def beta_symmetric(alpha: float, u1: Tensor, u2: Tensor) -> Tensor:
    """Beta(α, α) draws by Jöhnk's method from uniforms (..., T): the first of T candidates
    u1^(1/α) / (u1^(1/α) + u2^(1/α)) with u1^(1/α) + u2^(1/α) ≤ 1 (exact when one is
    accepted; 1/2 in the rare row where none is)."""
    if alpha == 1:  # Beta(1, 1) is uniform: the first candidate as it is
        return u1[..., 0]
    x, y = u1 ** (1 / alpha), u2 ** (1 / alpha)
    ok = (x + y <= 1) & (x + y > 0)
    first = torch.where(ok.any(-1), ok.double().argmax(-1), 0)
    ratio = (x / (x + y).clamp_min(1e-300)).gather(-1, first[..., None])[..., 0]
    return torch.where(ok.any(-1), ratio, torch.full_like(ratio, 0.5))


# -- the per-sample operations -----------------------------------------------------------------


def shift(x: Tensor, dy: Tensor, dx: Tensor, pad: int) -> Tensor:
    """Images (B, C, H, W) shifted by (dy − pad, dx − pad) pixels, dy, dx in [0, 2·pad]; the
    uncovered border takes each image's own minimum per channel (its background)."""
    b, c, h, w = x.shape
    fill = x.amin(dim=(2, 3))[:, :, None, None]
    padded = fill.expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad:pad + h, pad:pad + w] = x
    # One gather over flattened pixels: (y + dy)·(W + 2·pad) + x + dx for every output pixel.
    rows = dy[:, None, None] + torch.arange(h)[None, :, None]
    cols = dx[:, None, None] + torch.arange(w)[None, None, :]
    flat = (rows * (w + 2 * pad) + cols).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)


def cutmix_box(lam: Tensor, cy: Tensor, cx: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """CutMix's boxes: per sample a box of area ≈ (1 − λ)·H·W centred at (cy·H, cx·W), clipped
    to the image. Returns the mask (B, 1, H, W), True inside the box, and the exact λ (the
    share of the image outside it)."""
    ratio = (1 - lam).sqrt()
    bh, bw = (ratio * h).floor(), (ratio * w).floor()
    y0 = (cy * h - bh / 2).floor().clamp(0, h)
    y1 = (cy * h + bh / 2).floor().clamp(0, h)
    x0 = (cx * w - bw / 2).floor().clamp(0, w)
    x1 = (cx * w + bw / 2).floor().clamp(0, w)
    r, c = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    inside = ((r[None, :] >= y0[:, None]) & (r[None, :] < y1[:, None]))[:, :, None] & (
        (c[None, :] >= x0[:, None]) & (c[None, :] < x1[:, None]))[:, None, :]
    exact = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return inside[:, None], exact


def ngram_cut(x: Tensor, cut: Tensor, n: Tensor, start: Tensor, roles: TokenRoles) -> Tensor:
    """Tang et al.'s n-gram sampling on padded token ids (B, T): rows where `cut` keep their
    special tokens ([CLS], [SEP]) and the n[b] content tokens from content position
    ⌊start[b]·(c − n + 1)⌋ on (c: the row's content tokens; n clipped to c), moved to the
    front in order, then padding. Other rows are returned as they are."""
    content = ~torch.isin(x, torch.tensor(roles.special, dtype=x.dtype))
    c = content.sum(dim=1)
    n = torch.minimum(n, c)
    first = (start * (c - n + 1).double()).long().clamp_min(0)
    rank = content.cumsum(dim=1) - 1  # each content token's position among them
    window = content & (rank >= first[:, None]) & (rank < (first + n)[:, None])
    keep = (x != roles.pad) & (~content | window | ~cut[:, None])
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept first, in order
    out = x.gather(1, order)
    return out.masked_fill(torch.arange(x.shape[1]) >= keep.sum(dim=1, keepdim=True), roles.pad)


def mask_tokens(x: Tensor, u: Tensor, p: float, roles: TokenRoles) -> Tensor:
    """Padded token ids (B, T) with each non-special token where u < p set to the mask id."""
    special = torch.isin(x, torch.tensor(roles.special, dtype=x.dtype))
    return torch.where((u < p) & ~special, torch.full_like(x, roles.mask), x)


def swap_tokens(x: Tensor, u: Tensor, lo: float, hi: float, v: Tensor, classes: WordClasses,
                roles: TokenRoles) -> Tensor:
    """Padded token ids (B, T) with each non-special token where lo ≤ u < hi replaced by a
    token of its word class drawn with uniforms v (tokens without a class stay)."""
    special = torch.isin(x, torch.tensor(roles.special, dtype=x.dtype))
    return torch.where((u >= lo) & (u < hi) & ~special, classes.sample(x, v), x)


# Hash slots of one view's random numbers (sample, view, slot).
(_DY, _DX, _FLIP, _PARTNER, _MIXES, _CY, _CX, _PARTNER_AUG, _OFFSET, _BETA, _MASK, _CUT, _N,
 _START, _SWAP) = range(15)


class TransferViews:
    """The views of training inputs `x` (N, ...) with labels `y` (N,) under `cfg`.

    `inputs(i, k)`: the views (B, ...) of samples i (B,) numbered k (B,); `batch(i, k)`: the
    training batch (index, view, input, label; label_b and mix when views are mixed). Inputs
    may be a lazily decoded `LazyInputs` (an image folder): rows are read by index.
    """

    def __init__(self, x: Tensor, y: Tensor, cfg: TransferSetConfig,
                 tokens: TokenRoles | None = None, classes: WordClasses | None = None) -> None:
        if cfg.needs_tokens and tokens is None:
            raise ValueError("mask_prob / ngram_prob / swap_prob need the token roles of "
                             "padded text")
        if cfg.swap_prob and classes is None:
            raise ValueError("swap_prob needs word classes (make_views builds them)")
        self.x, self.y, self.cfg, self.tokens, self.classes = x, y, cfg, tokens, classes

    @property
    def num_views(self) -> int | None:
        return self.cfg.views

    def _augment(self, x: Tensor, i: Tensor, k: Tensor, salt: int) -> Tensor:
        cfg, seed = self.cfg, self.cfg.seed
        if cfg.needs_tokens:
            return self._token_view(x, i, k)
        if cfg.jitter:
            span = 2 * cfg.jitter + 1
            dy = (uniform(seed, i, k, _DY + salt) * span).long()
            dx = (uniform(seed, i, k, _DX + salt) * span).long()
            x = shift(x, dy, dx, cfg.jitter)
        if cfg.flip:
            mirror = uniform(seed, i, k, _FLIP + salt) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x

    def _token_view(self, x: Tensor, i: Tensor, k: Tensor) -> Tensor:
        cfg, seed, roles = self.cfg, self.cfg.seed, self.tokens
        assert roles is not None  # checked in __init__
        if cfg.ngram_prob:
            n = 1 + (uniform(seed, i, k, _N) * cfg.ngram_max).long().clamp_max(cfg.ngram_max - 1)
            x = ngram_cut(x, uniform(seed, i, k, _CUT) < cfg.ngram_prob, n,
                          uniform(seed, i, k, _START), roles)
        if cfg.mask_prob or cfg.swap_prob:
            # One uniform per position decides both, as in Tang et al.: masked below
            # mask_prob, swapped in the next swap_prob of it, never both.
            pos = torch.arange(x.shape[1])[None]
            u = uniform(seed, i[:, None], k[:, None], _MASK, pos)
            if cfg.swap_prob:
                assert self.classes is not None  # checked in __init__
                v = uniform(seed, i[:, None], k[:, None], _SWAP, pos)
                x = swap_tokens(x, u, cfg.mask_prob, cfg.mask_prob + cfg.swap_prob, v,
                                self.classes, roles)
            if cfg.mask_prob:
                x = mask_tokens(x, u, cfg.mask_prob, roles)
        return x

    def _mixed(self, x: Tensor, i: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mixed inputs, partner indices j, λ as float32)."""
        cfg, seed = self.cfg, self.cfg.seed
        n = len(self.x)
        j = (uniform(seed, i, k, _PARTNER) * n).long().clamp_max(n - 1)
        partner = self._augment(self.x[j], j, k, _PARTNER_AUG)
        tries = torch.arange(_BETA_TRIES[cfg.mix_alpha <= 1])
        lam = beta_symmetric(cfg.mix_alpha,
                             uniform(seed, i[:, None], k[:, None], _BETA + 2 * tries),
                             uniform(seed, i[:, None], k[:, None], _BETA + 2 * tries + 1))
        mixes = uniform(seed, i, k, _MIXES) < cfg.mix_prob
        lam = torch.where(mixes, lam, torch.ones_like(lam))
        if cfg.mix == "mixup":
            w = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            return w * x + (1 - w) * partner, j, lam.float()
        inside, lam = cutmix_box(lam, uniform(seed, i, k, _CY), uniform(seed, i, k, _CX),
                                 x.shape[-2], x.shape[-1])
        return torch.where(inside, partner, x), j, lam.float()

    def inputs(self, i: Tensor, k: Tensor) -> Tensor:
        return self.batch(i, k)["input"]

    def batch(self, i: Tensor, k: Tensor) -> Batch:
        x = self._augment(self.x[i], i, k, 0)
        out: Batch = {"index": i, "view": k, "label": self.y[i]}
        if self.cfg.mixes:
            x, j, lam = self._mixed(x, i, k)
            out.update({"label_b": self.y[j], "mix": lam})
        out["input"] = x
        return out


class ViewRows:
    """All N·K views as rows i·K + k, for the teacher cache: `len`, and rows by slice or by an
    index tensor."""

    def __init__(self, views: TransferViews) -> None:
        if views.num_views is None:
            raise ValueError("fresh views every epoch (views: null) have no rows to cache")
        self.views, self.k = views, views.num_views

    def __len__(self) -> int:
        return len(self.views.x) * self.k

    def __getitem__(self, key: slice | Tensor) -> Tensor:
        rows = torch.arange(len(self))[key] if isinstance(key, slice) else key
        return self.views.inputs(rows // self.k, rows % self.k)


class TransferLoader(BatchLoader):
    """A `BatchLoader` whose epoch shows every training sample once, as one of its views:
    (epoch + o_i) mod K, or a fresh one (k = epoch) when `views` is null. Batches add `view`
    (k, which with `index` keys the cache's row) and, for mixed views, `label_b` and `mix`.
    Views are made in this process (no decoding workers)."""

    def __init__(self, views: TransferViews, *, batch_size: int, seed: int = 0) -> None:
        super().__init__(views.x, views.y, batch_size=batch_size, shuffle=True, seed=seed)
        self.views = views
        self.num_workers = 0

    def view_numbers(self, i: Tensor, epoch: int) -> Tensor:
        k = self.views.num_views
        if k is None:
            return torch.full_like(i, epoch)
        offset = (uniform(self.seed, i, 0, _OFFSET) * k).long()
        return (epoch + offset) % k

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = torch.randperm(len(self.x), generator=_generator(self.seed, epoch))
        for b in range(start, len(self)):
            i = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.views.batch(i, self.view_numbers(i, epoch))


def cache_rows(num_samples: int, cfg: TransferSetConfig) -> int:
    """Rows of the teacher cache over this transfer set."""
    return num_samples * (cfg.views or 1)


def transfer_inputs(splits: DataSplits, *, unlabelled: bool) -> tuple[Tensor, Tensor]:
    """The samples views are made of: the training split, then, for a distilled student
    (`unlabelled`), the other source's inputs with no label (IGNORE_INDEX: only the teacher's
    term scores them)."""
    extra = splits.unlabelled_x
    if not unlabelled or extra is None or not len(extra):
        return splits.train_x, splits.train_y
    missing = torch.full((len(extra),), IGNORE_INDEX, dtype=splits.train_y.dtype)
    return torch.cat([splits.train_x, extra]), torch.cat([splits.train_y, missing])


def num_transfer_inputs(splits: DataSplits) -> int:
    """How many samples the teacher labels: the training split and the unlabelled inputs
    (`transfer_inputs(..., unlabelled=True)` without building them)."""
    extra = getattr(splits, "unlabelled_x", None)
    return len(splits.train_x) + (0 if extra is None else len(extra))


def make_views(splits: DataSplits, ts: TransferSetConfig, *, unlabelled: bool) -> TransferViews:
    """The views of `transfer_inputs(splits, unlabelled=...)`. Word classes for swaps come from
    every input of the transfer set whichever student asks, so the student alone swaps within
    the classes of the views the teacher labelled."""
    x, y = transfer_inputs(splits, unlabelled=unlabelled)
    classes = None
    if ts.swap_prob:
        assert splits.tokens is not None  # check_views: swaps need padded text
        every, _ = transfer_inputs(splits, unlabelled=True)
        # Keyed by the texts' bytes, not a fingerprint a caller may have made up: a run asks
        # once per student and once for the cache, and building takes about a second.
        key = (hashlib.sha256(every.numpy().tobytes()).hexdigest(), splits.tokens,
               ts.swap_classes, ts.seed)
        if key not in _CLASSES:
            _CLASSES.clear()
            _CLASSES[key] = build_word_classes(every, splits.tokens, ts.swap_classes, ts.seed)
        classes = _CLASSES[key]
    return TransferViews(x, y, ts, splits.tokens, classes)


_CLASSES: dict[tuple, WordClasses] = {}  # the last transfer set's word classes


def views_key(splits: DataSplits, cfg: TransferSetConfig) -> str:
    """The data part of a transfer set cache's key: the data, the views' recipe and the
    other source's inputs themselves."""
    key = f"{splits.fingerprint}/views-{cfg.digest()}"
    if splits.unlabelled_x is not None:
        key += "/" + hashlib.sha256(splits.unlabelled_x.numpy().tobytes()).hexdigest()[:16]
    return key


def describe(cfg: TransferSetConfig, num_samples: int, num_unlabelled: int = 0) -> str:
    """One line for the run's log."""
    aug = [f"jitter ±{cfg.jitter} px"] if cfg.jitter else []
    aug += ["flip"] if cfg.flip else []
    if cfg.mixes:
        aug.append(f"{cfg.mix} (α {cfg.mix_alpha:g}, {cfg.mix_prob:.0%} of views)")
    aug += [f"mask {cfg.mask_prob:.0%} of tokens"] if cfg.mask_prob else []
    if cfg.swap_prob:
        aug.append(f"swap {cfg.swap_prob:.0%} of tokens within {cfg.swap_classes} word classes")
    if cfg.ngram_prob:
        aug.append(f"{cfg.ngram_prob:.0%} of views cut to an n-gram (n ≤ {cfg.ngram_max})")
    total = num_samples + num_unlabelled
    samples = f"{num_samples} samples" + (f" + {num_unlabelled} unlabelled (distilled "
                                          "student only)" if num_unlabelled else "")
    count = (f"{cfg.views} views x {samples} = {cache_rows(total, cfg):,} inputs"
             if cfg.views else f"a fresh view per sample and epoch, {samples}")
    augmentation = ", ".join(aug) or "no augmentation"
    return f"transfer set: {count}; {augmentation}; teacher {cfg.teaching}"
