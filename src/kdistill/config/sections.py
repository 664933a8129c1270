"""Recipe sections that stand alone: the teacher cache (`cache:`) and evaluation (`eval:`),
and the strict base every section derives from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class CacheConfig(_Strict):
    enabled: bool = Field(True, description="cache teacher outputs when inputs are deterministic")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: Annotated[int, Field(ge=1)] = 1000
    max_mb: Annotated[float, Field(gt=0)] = Field(
        2048, description="teacher layer outputs a method reads are cached with the logits "
        "when the whole cache stays under this many MB; otherwise the teacher runs online"
    )
    topk: Annotated[int, Field(ge=1)] | None = Field(
        None, description="causal LMs: store only the teacher's top-k log-probabilities and "
        "their indices per token (method token_kd, kind forward_kl); null: dense logits"
    )
    tail_samples: Annotated[int, Field(ge=0)] = Field(
        0, description="top-k caches: of the k entries per token, this many are draws from the "
        "teacher's distribution outside its top k - tail_samples, weighted so the stored "
        "distribution is an unbiased estimate of the teacher's; 0: the plain top k")
    tail_sampling: Literal["independent", "systematic"] = Field(
        "independent", description="tail_samples: independent draws, or systematic ones (m "
        "evenly spaced points through the tail's CDF: unbiased too, lower variance)")

    @model_validator(mode="after")
    def _tail_within_topk(self) -> CacheConfig:
        if self.tail_samples and (self.topk is None or self.tail_samples >= self.topk):
            raise ValueError(f"tail_samples: {self.tail_samples} of the top-k cache's entries "
                             f"(topk: {self.topk}); needs cache.topk above it")
        if self.tail_sampling != "independent" and not self.tail_samples:
            raise ValueError("tail_sampling: how tail_samples are drawn; set tail_samples")
        return self


class EvalConfig(_Strict):
    batch_size: Annotated[int, Field(ge=1)] = 1000
    ece_bins: Annotated[int, Field(ge=2)] = 15
    throughput_batch: Annotated[int, Field(ge=1)] = 256
    latency_repeats: Annotated[int, Field(ge=3)] = 30
    samples: Annotated[int, Field(ge=0)] = Field(
        3, description="causal LMs: greedy continuations of this many test prompts in the report")
    sample_tokens: Annotated[int, Field(ge=1)] = Field(
        24, description="causal LMs: prompt length and new tokens of each report sample")
    beam: Annotated[int, Field(ge=1)] = Field(
        4, description="translation: beam size of the test-set BLEU / chrF (greedy is also "
        "reported)")
    length_penalty: Annotated[float, Field(ge=0)] = Field(
        1.0, description="translation: beam score / length^length_penalty picks the output")
