"""Loss functions: pure, keyword-only hyper-parameters, one file per family.

`logits` holds the losses on class/vocabulary logits; `_reduce` the masked, token-normalised
reduction they all share. Families added later (feature losses, chunked LLM variants) are
re-exported here the same way.
"""

from kdistill.losses._reduce import Reduction, reduce_loss
from kdistill.losses.logit_variants import dist_loss, dkd
from kdistill.losses.logits import hard_cross_entropy, kd_kl, soft_cross_entropy

__all__ = [
    "Reduction",
    "dist_loss",
    "dkd",
    "hard_cross_entropy",
    "kd_kl",
    "reduce_loss",
    "soft_cross_entropy",
]
