"""Loss functions: pure, keyword-only hyper-parameters, one file per family.

`logits` holds the losses on class/vocabulary logits; `_reduce` the masked, token-normalised
reduction they all share. Families added later (feature losses, chunked LLM variants) are
re-exported here the same way.
"""

from kdistill.losses._reduce import Reduction, reduce_loss
from kdistill.losses.chunked import chunked_token_distill_loss, fused_linear_token_distill_loss
from kdistill.losses.datafree import (
    activation_loss,
    bn_statistics_loss,
    class_balance_loss,
    l1_discrepancy,
    one_hot_loss,
)
from kdistill.losses.embedding import cosine_distance, embedding_mse
from kdistill.losses.logit_variants import dist_loss, dkd
from kdistill.losses.logits import (
    hard_cross_entropy,
    kd_kl,
    mixed_cross_entropy,
    soft_cross_entropy,
)
from kdistill.losses.tokens import (
    TokenKDKind,
    TokenLoss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    shift_labels,
    token_distill_loss,
    token_kd,
    token_normalizer,
    total_variation,
)
from kdistill.losses.topk import (
    TOPK_KINDS,
    TopKMissing,
    densify_topk,
    topk_distill_loss,
    topk_kd,
)

__all__ = [
    "TOPK_KINDS",
    "Reduction",
    "TokenKDKind",
    "TokenLoss",
    "TopKMissing",
    "activation_loss",
    "bn_statistics_loss",
    "chunked_token_distill_loss",
    "class_balance_loss",
    "cosine_distance",
    "densify_topk",
    "dist_loss",
    "dkd",
    "embedding_mse",
    "forward_kl",
    "fused_linear_token_distill_loss",
    "generalized_jsd",
    "hard_cross_entropy",
    "kd_kl",
    "l1_discrepancy",
    "mixed_cross_entropy",
    "one_hot_loss",
    "reduce_loss",
    "reverse_kl",
    "shift_labels",
    "soft_cross_entropy",
    "token_distill_loss",
    "token_kd",
    "token_normalizer",
    "topk_distill_loss",
    "topk_kd",
    "total_variation",
]
