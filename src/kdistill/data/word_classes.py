"""Word classes induced from text, for Tang et al.'s same-class word swaps (no tagger needed).

Tang et al. 2019 (arXiv:1903.12136, "Distilling task-specific knowledge from BERT into simple
neural networks") build their transfer set partly by replacing a word, with probability
p_pos, by another word of the same part-of-speech tag, drawn from the unigram distribution
restricted to that tag. No tagger can be downloaded here, and none would serve every
tokenizer, so the classes are induced from the transfer set's own text the way Schütze
("Distributional part-of-speech tagging", EACL 1995) induces tags: a token's left and right
neighbours, counted over the most frequent tokens, Hellinger-normalised, reduced by SVD and
clustered by k-means. Tokens with the same neighbours fill the same syntactic slot (in BERT's
WordPiece, "##ing" pieces gather with other suffixes, stems followed by "##" pieces with other
stems), which is what a same-tag swap needs: the sentence keeps its shape, the word changes.

The unit is the tokenizer's token, so the swaps work for any tokenizer. A token seen fewer
than `MIN_COUNT` times has no class and is never swapped (as rare words have no reliable
neighbours), nor is a token alone in its class; a swap never returns the token itself, so
about swap_prob of the classed tokens change. The classes are a deterministic function of
the text, the number of classes and the seed, so the teacher's cached views equal the
students' live ones; `VERSION` and the constants below are part of the views' digest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdistill.errors import ConfigError
from kdistill.types import TokenRoles

MIN_COUNT = 5  # occurrences a token needs to get a class
# How classes are made, in the transfer set's digest: a change here changes every view, and
# caches of the old views must read as stale.
VERSION = "schuetze-2"  # 1: a hand-written k-means (the swap figures in docs/benchmarks.md)
CONTEXTS = 256  # the most frequent tokens, whose counts as neighbours describe a token
DIMS = 48  # SVD dimensions the k-means runs in
N_INIT = 4  # k-means starts, the best kept


def class_recipe() -> str:
    """How the classes are made, for the views' digest."""
    import sklearn

    return f"{VERSION}/{MIN_COUNT}/{CONTEXTS}/{DIMS}/{N_INIT}/sklearn-{sklearn.__version__}"


@dataclass(frozen=True, eq=False)
class WordClasses:
    """`label` (V,): each token id's class, −1 for none; `position` (V,): its index in `pool`.
    `pool`: the classed ids sorted by class; `cum`: cumulative counts over `pool` (float64);
    class c holds pool[start[c]:end[c]]."""

    label: Tensor
    position: Tensor
    pool: Tensor
    cum: Tensor
    start: Tensor
    end: Tensor

    def sample(self, ids: Tensor, u: Tensor) -> Tensor:
        """Another token of the class of each of `ids` (any shape), drawn in proportion to its
        count by inverse CDF from uniforms `u` (same shape), the token itself left out (a swap
        that keeps the token would be no swap); ids without a class, or alone in theirs, stay."""
        known = torch.where(ids < len(self.label), ids, 0)
        cls = torch.where(ids < len(self.label), self.label[known], -1)
        has = cls >= 0
        c, p = cls.clamp_min(0), self.position[known].clamp_min(0)
        a, b = self.start[c], self.end[c]
        zero = torch.zeros((), dtype=torch.float64)
        lo = torch.where(a > 0, self.cum[(a - 1).clamp_min(0)], zero)
        own_end = self.cum[p]
        own_start = torch.where(p > 0, self.cum[(p - 1).clamp_min(0)], zero)
        # Draw over the class's mass less the token's own, then step over its interval.
        target = lo + u.double() * (self.cum[b - 1] - lo - (own_end - own_start))
        target = torch.where(target >= own_start, target + (own_end - own_start), target)
        j = torch.searchsorted(self.cum, target, right=True)
        j = torch.minimum(torch.maximum(j, a), b - 1)  # u at the edges stays in the class
        return torch.where(has & (b - a > 1), self.pool[j], ids)


def build_word_classes(x: Tensor, roles: TokenRoles, num_classes: int,
                       seed: int) -> WordClasses:
    """Classes of the tokens of padded texts `x` (N, T) int64, `num_classes` of them."""
    counts, ids = check_word_classes(x, roles, num_classes)
    vocab = len(counts)
    features = _neighbour_profiles(x, x != roles.pad, ids, vocab)
    label = torch.full((vocab,), -1, dtype=torch.int64)
    label[ids] = _kmeans(_reduce(features), num_classes, seed)
    order = torch.argsort(label[ids] * vocab + ids)  # by class, then by id
    pool = ids[order]
    sizes = torch.bincount(label[pool], minlength=num_classes)
    end = sizes.cumsum(0)
    position = torch.full((vocab,), -1, dtype=torch.int64)
    position[pool] = torch.arange(len(pool))
    return WordClasses(label=label, position=position, pool=pool,
                       cum=counts[pool].double().cumsum(0), start=end - sizes, end=end)


def check_word_classes(x: Tensor, roles: TokenRoles, num_classes: int) -> tuple[Tensor, Tensor]:
    """(counts (V,), the ids that get a class); a one-line error when fewer ids than classes
    occur often enough (checked before any teacher trains)."""
    frame = torch.tensor(sorted({*roles.special, roles.pad, roles.mask}), dtype=x.dtype)
    vocab = int(max(int(x.max()), int(frame.max()))) + 1
    counts = torch.bincount(x[(x != roles.pad) & ~torch.isin(x, frame)], minlength=vocab)
    ids = torch.nonzero(counts >= MIN_COUNT).flatten()
    if len(ids) < 2 * num_classes:
        fix = (f"set swap_classes to {len(ids) // 2} or fewer, or add text" if len(ids) >= 4
               else "add text, or remove swap_prob")
        raise ConfigError("transfer_set.swap_classes",
                          f"only {len(ids)} tokens occur {MIN_COUNT} or more times in the "
                          f"transfer set's text; expected at least two per class "
                          f"({2 * num_classes} for swap_classes {num_classes}): {fix}")
    return counts, ids


def _neighbour_profiles(x: Tensor, real: Tensor, ids: Tensor, vocab: int) -> Tensor:
    """(len(ids), 2·CONTEXTS) counts of each token's left, then right, neighbours among the
    most frequent tokens ([CLS] and [SEP] included: they mark a text's first and last word)."""
    all_counts = torch.bincount(x[real], minlength=vocab)
    top = torch.argsort(-all_counts, stable=True)[:CONTEXTS]
    top = top[all_counts[top] > 0]
    feature = torch.full((vocab,), -1, dtype=torch.int64)
    feature[top] = torch.arange(len(top))
    row = torch.full((vocab,), -1, dtype=torch.int64)
    row[ids] = torch.arange(len(ids))
    width = 2 * CONTEXTS
    flat = []
    for target, context, side in ((x[:, 1:], x[:, :-1], 0), (x[:, :-1], x[:, 1:], CONTEXTS)):
        r, f = row[target], feature[context]
        ok = (r >= 0) & (f >= 0)
        flat.append(r[ok] * width + f[ok] + side)
    counts = torch.bincount(torch.cat(flat), minlength=len(ids) * width)
    return counts.view(len(ids), width).double()


def _reduce(counts: Tensor) -> Tensor:
    """Hellinger rows (square roots of the neighbour distributions), centred, projected on
    their top DIMS principal directions, scaled to unit length (k-means then compares
    directions, as cosine similarity does)."""
    rows = (counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).sqrt()
    rows = rows - rows.mean(dim=0)
    u, s, _ = torch.linalg.svd(rows, full_matrices=False)
    z = u[:, :DIMS] * s[:DIMS]
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _kmeans(z: Tensor, k: int, seed: int) -> Tensor:
    """Cluster labels (N,) of points z (N, D): scikit-learn's k-means (k-means++ seeding,
    Lloyd's iterations, the best of N_INIT starts), seeded."""
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=k, init="k-means++", n_init=N_INIT, random_state=seed % 2**32)
    return torch.from_numpy(model.fit_predict(z.numpy())).long()
