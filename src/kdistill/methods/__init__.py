"""Distillation methods. Adding one: a file here, one line in METHODS, one recipe."""

from __future__ import annotations

from kdistill.methods.attention_maps import AttentionDistill
from kdistill.methods.attention_transfer import AT
from kdistill.methods.base import Batch, Method, MethodConfig, Outputs
from kdistill.methods.ce import CE
from kdistill.methods.crd import CRD
from kdistill.methods.cross_attention import CrossAttentionDistill
from kdistill.methods.datafree import DAFL, DFAD
from kdistill.methods.dist import DIST
from kdistill.methods.dkd import DKD
from kdistill.methods.embed_kd import EmbedKD
from kdistill.methods.fitnet import FitNet
from kdistill.methods.gkd import GKD
from kdistill.methods.kd import KD
from kdistill.methods.logit_std import LogitStd
from kdistill.methods.multi_kd import MultiKD
from kdistill.methods.pkt import PKT
from kdistill.methods.rkd import RKD
from kdistill.methods.self_distill import SelfDistill
from kdistill.methods.seq_kd import SeqKD
from kdistill.methods.sp import SP
from kdistill.methods.tinybert import TinyBERT
from kdistill.methods.token_kd import TokenKD

METHODS: dict[str, type[Method]] = {
    "ce": CE,
    "kd": KD,
    "dkd": DKD,
    "dist": DIST,
    "logit_std": LogitStd,
    "fitnet": FitNet,
    "at": AT,
    "sp": SP,
    "attn": AttentionDistill,
    "tinybert": TinyBERT,
    "rkd": RKD,
    "pkt": PKT,
    "crd": CRD,
    "self_distill": SelfDistill,
    "multi_kd": MultiKD,
    "token_kd": TokenKD,
    "gkd": GKD,
    "seq_kd": SeqKD,
    "cross_attn": CrossAttentionDistill,
    "dafl": DAFL,
    "dfad": DFAD,
    "embed_kd": EmbedKD,
}

__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "Outputs", "build_method"]


def build_method(cfg: MethodConfig) -> Method:
    """Instantiate the method named by `cfg.name` with its typed config."""
    return METHODS[cfg.name](cfg)
