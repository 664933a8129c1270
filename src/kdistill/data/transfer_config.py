"""`transfer_set:` in a recipe (`kdistill.data.transfer` makes the views it describes)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdistill.data.word_classes import class_recipe

# Fields added after the first transfer-set caches (text views, another source's inputs)
_LATER_FIELDS = ("mask_prob", "ngram_prob", "ngram_max", "unlabelled", "swap_prob",
                 "swap_classes")


class TransferSetConfig(BaseModel):
    """`transfer_set:` in a recipe: the augmented views the students (distilled and alone) are
    trained on, and where the teacher's outputs on them come from."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
    views: Annotated[int, Field(ge=1)] | None = Field(
        8, description="K views per training sample, the teacher's outputs on all N·K cached "
        "once; null: a fresh view every epoch (teaching: online)")
    teaching: Literal["cached", "online"] = Field(
        "cached", description="cached: the teacher's outputs on the K views, stored; online: "
        "the teacher runs on each batch's views (the same values, more teacher passes)")
    jitter: Annotated[int, Field(ge=0)] = Field(
        0, description="random shifts of up to this many pixels (image inputs), pad = the "
        "image's own minimum per channel")
    flip: bool = Field(False, description="mirror half of the views (image inputs)")
    mix: Literal["none", "mixup", "cutmix"] = Field(
        "none", description="mix each view with another training input's view")
    mix_alpha: Annotated[float, Field(gt=0, le=2)] = Field(
        1.0, description="λ ~ Beta(α, α), the weight of the sample's own input")
    mix_prob: Annotated[float, Field(ge=0, le=1)] = Field(
        1.0, description="the share of views that are mixed")
    mask_prob: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="token inputs: each token (never a special one) of a view becomes "
        "the mask token with this probability (Tang et al. 2019)")
    ngram_prob: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="token inputs: the share of views cut down to one random n-gram of "
        "the text, n uniform in 1..ngram_max (Tang et al. 2019)")
    ngram_max: Annotated[int, Field(ge=1)] = Field(5, description="the longest n-gram kept")
    swap_prob: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="token inputs: each token with a word class (seen 5 or more times, "
        "not alone in its class; never a special or a masked one) is replaced with this "
        "probability by another token of its class, drawn by frequency (Tang et al. 2019's "
        "same-tag swaps; classes induced from every text of the transfer set, unlabelled ones "
        "too: kdistill.data.word_classes)")
    swap_classes: Annotated[int, Field(ge=2)] = Field(
        64, description="how many word classes the swaps induce")
    seed: Annotated[int, Field(ge=0, lt=2**63)] = Field(
        0, description="the views' seed (one cache serves every student seed)")

    @model_validator(mode="after")
    def _consistent(self) -> TransferSetConfig:
        if self.views is None and self.teaching == "cached":
            raise ValueError("views: null (a fresh view every epoch) cannot be cached; set "
                             "teaching: online, or a number of views")
        fields = type(self).model_fields  # by value: overrides re-validate a full dump
        unused = [f for f in ("mix_alpha", "mix_prob")
                  if self.mix == "none" and getattr(self, f) != fields[f].default]
        if unused:
            raise ValueError(f"{', '.join(unused)}: used only with mix: mixup or cutmix; "
                             "remove it or set mix")
        if not self.ngram_prob and self.ngram_max != fields["ngram_max"].default:
            raise ValueError("ngram_max: used only with ngram_prob > 0")
        if not self.swap_prob and self.swap_classes != fields["swap_classes"].default:
            raise ValueError("swap_classes: used only with swap_prob > 0")
        if self.mask_prob + self.swap_prob >= 1:
            raise ValueError("mask_prob + swap_prob: a token is masked or swapped, never both; "
                             "expected a sum below 1")
        if self.needs_images and self.needs_tokens:
            raise ValueError("jitter / flip / cutmix change images, mask_prob / ngram_prob "
                             "token ids: one input holds one kind")
        if not (self.needs_images or self.needs_tokens or self.mixes):
            if not self._has_other_inputs():
                raise ValueError("no augmentation (jitter, flip, mix, mask_prob, ngram_prob "
                                 "or swap_prob): every view would be the input itself; remove "
                                 "transfer_set or add one")
            if self.views != 1:
                raise ValueError("views: without augmentation every view is the input itself;"
                                 " set views: 1 (the unlabelled inputs alone)")
        return self

    def _has_other_inputs(self) -> bool:
        """A run's transfer set may add another source's inputs (`unlabelled`): then views
        without augmentation still add to the training set."""
        return False

    @property
    def mixes(self) -> bool:
        return self.mix != "none" and self.mix_prob > 0

    @property
    def needs_images(self) -> bool:
        return bool(self.jitter or self.flip or self.mix == "cutmix")

    @property
    def needs_tokens(self) -> bool:
        return bool(self.mask_prob or self.ngram_prob or self.swap_prob)

    def spec(self) -> dict[str, object]:
        """The settings as stage fingerprints see them: fields added later are left out at
        their defaults, so caches and students made before them stay valid."""
        spec = self.model_dump(mode="json")
        fields = type(self).model_fields
        for name in _LATER_FIELDS:
            if name in spec and spec[name] == fields[name].default:
                del spec[name]
        return spec

    def digest(self) -> str:
        """What the views depend on (not `teaching`), for cache keys and stage fingerprints."""
        spec = {k: v for k, v in self.spec().items() if k != "teaching"}
        if self.swap_prob:  # how the word classes are made (only then: older digests stay)
            spec["word_classes"] = class_recipe()
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
