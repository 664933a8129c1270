"""TinyBERT's layer-wise objective (Jiao et al. 2020, arXiv:1909.10351): embeddings, hidden
states and attention maps over a whole layer map, plus the prediction layer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from kdistill.adapters import make_adapter, probe_shapes
from kdistill.errors import ConfigError
from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.losses.attention import attention_probs_loss
from kdistill.losses.features import hidden_mse
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, UnitWeight, value_at


class TinyBERTConfig(MethodConfig):
    """loss = w_h·Σ_hidden MSE(W_h·H_s, H_t) + w_a·Σ_attn attn(A_s, A_t)
    + α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE.

    `hidden_pairs` lists [student_module, teacher_module] whose outputs are channels-first
    states (B, C, T) (the text encoders' `tokens.<k>`, `tokens.0` = embeddings: TinyBERT's
    L_embd is the pair [tokens.0, tokens.0]); each pair has its own trained 1x1 map W_h (a
    per-token linear layer), also when widths are equal, as in TinyBERT. `attention_pairs`
    lists modules giving attention probabilities (B, heads, T, T), or tuples holding them at
    `output_index` (Hugging Face attention: 1). The two lists *are* the layer map g(m).

    Padding: with `mask_padding` and a student that exposes `pad_id` (every kdistill text
    model), positions whose input id is the pad id are left out of both sums (hidden MSE per
    real token; attention rows of real queries over real keys). The attention term is on
    probabilities (`attention_probs_loss`), MSE as TinyBERT (which uses unnormalised scores)
    or MiniLM's KL. The prediction term follows `kd`'s convention (T² applied); TinyBERT's
    own setting is α = 1, T = 1 (soft cross-entropy, no labels), the defaults here.

    `intermediate_epochs: N > 0` is TinyBERT's two steps: intermediate layers alone for N
    epochs, then the prediction layer alone; 0 trains every term jointly.
    """

    name: Literal["tinybert"] = "tinybert"
    hidden_pairs: list[tuple[str, str]] = Field(
        [], description="[student, teacher] modules of channels-first states (B, C, T)")
    attention_pairs: list[tuple[str, str]] = Field(
        [], description="[student, teacher] modules of attention probabilities")
    output_index: int | None = Field(
        None, ge=0, description="attention modules with tuple outputs: the probabilities' "
        "element (HF: 1)")
    attention_kind: Literal["mse", "kl"] = "mse"
    heads: Literal["mean", "match"] = "match"
    mask_padding: bool = Field(True, description="leave padded tokens (student.pad_id) out")
    hidden_weight: Schedule = 1.0
    attention_weight: Schedule = 1.0
    intermediate_epochs: int = Field(0, ge=0)
    temperature: Temperature = 1.0
    alpha: UnitWeight = 1.0

    @model_validator(mode="after")
    def _some_layers(self) -> TinyBERTConfig:
        if not self.hidden_pairs and not self.attention_pairs:
            raise ValueError("hidden_pairs: give at least one hidden or attention pair (or use "
                             "kd for the prediction layer alone)")
        return self


class TinyBERT(Method):
    """Hidden states through per-pair W_h, attention maps, and soft targets over a layer map."""

    config_type = TinyBERTConfig
    paper = "Jiao et al. 2020, TinyBERT: Distilling BERT for NLU (arXiv:1909.10351)"
    example = Example(
        {"hidden_pairs": [["tokens.0", "tokens.0"], ["tokens.1", "tokens.2"]],
         "attention_pairs": [["bert.encoder.layer.0.attention.self",
                              "bert.encoder.layer.1.attention.self"]],
         "output_index": 1, "alpha": 0.5}, nets="bert")
    cfg: TinyBERTConfig

    def __init__(self, cfg: TinyBERTConfig) -> None:
        super().__init__(cfg)
        self.adapters = nn.ModuleList()
        self._pad_id: int | None = None

    def _key(self, name: str) -> str:
        index = self.cfg.output_index
        return name if index is None else f"{name}[{index}]"  # `capture` reads tuple item i

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (*(s for s, _ in self.cfg.hidden_pairs),
                *(self._key(s) for s, _ in self.cfg.attention_pairs))

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (*(t for _, t in self.cfg.hidden_pairs),
                *(self._key(t) for _, t in self.cfg.attention_pairs))

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        if teacher is None:
            raise ValueError("tinybert needs the teacher network to probe its layers")
        self._pad_id = getattr(student, "pad_id", None) if self.cfg.mask_padding else None
        s_names = [s for s, _ in self.cfg.hidden_pairs]
        t_names = [t for _, t in self.cfg.hidden_pairs]
        s = probe_shapes(student, s_names, example, where="method.hidden_pairs")
        t = probe_shapes(teacher, t_names, example, where="method.hidden_pairs")
        self.adapters = nn.ModuleList()
        for s_name, t_name in self.cfg.hidden_pairs:
            s_shape, t_shape = s[s_name], t[t_name]
            if len(s_shape) != 2 or s_shape[1:] != t_shape[1:] or len(t_shape) != 2:
                raise ConfigError("method.hidden_pairs", (
                    f"'{s_name}' gives {s_shape} and '{t_name}' {t_shape} per sample; TinyBERT "
                    f"pairs channels-first token states (hidden, tokens) of the same length "
                    f"(text encoders: tokens.<k>)"))
            self.adapters.append(make_adapter(s_shape, t_shape))  # Conv1d 1x1: W_h per token

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {
            "temperature": value_at(self.cfg.temperature, progress),
            "alpha": value_at(self.cfg.alpha, progress),
            "hidden_weight": value_at(self.cfg.hidden_weight, progress),
            "attention_weight": value_at(self.cfg.attention_weight, progress),
        }

    def _mask(self, batch: Batch) -> Tensor | None:
        if self._pad_id is None:
            return None
        ids = batch["input"]
        if ids.dim() != 2 or ids.is_floating_point():
            raise ConfigError("method.mask_padding", f"needs token ids (B, T); got inputs of "
                              f"shape {tuple(ids.shape)}; set mask_padding: false")
        return ids != self._pad_id

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "tinybert needs teacher outputs"
        s = self.scalars(progress)
        two_step = self.cfg.intermediate_epochs > 0
        intermediate = progress.epoch < self.cfg.intermediate_epochs
        terms: dict[str, Tensor] = {}
        if intermediate or not two_step:
            mask = self._mask(batch)
            if self.cfg.hidden_pairs:
                hidden: Tensor | float = 0.0
                for adapter, (s_name, t_name) in zip(self.adapters, self.cfg.hidden_pairs,
                                                      strict=True):
                    hidden = hidden + hidden_mse(adapter(out.student_feats[s_name].float()),
                                                 out.teacher_feats[t_name], mask=mask)
                terms["hidden"] = s["hidden_weight"] * hidden
            if self.cfg.attention_pairs:
                attn: Tensor | float = 0.0
                for s_name, t_name in self.cfg.attention_pairs:
                    attn = attn + attention_probs_loss(
                        out.student_feats[self._key(s_name)], out.teacher_feats[self._key(t_name)],
                        kind=self.cfg.attention_kind, heads=self.cfg.heads, mask=mask)
                terms["attn"] = s["attention_weight"] * attn
        if not intermediate:
            kd = kd_kl(out.student_logits, out.teacher_logits, temperature=s["temperature"])
            terms["kd"] = s["alpha"] * kd
            # Always present (0 at α = 1) so a scheduled α logs the same terms every step.
            terms["ce"] = (1 - s["alpha"]) * hard_cross_entropy(out.student_logits,
                                                                batch["label"])
        return terms
