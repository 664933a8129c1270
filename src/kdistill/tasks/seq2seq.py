"""Translation (seq2seq): packed (N, 2, L) ids -> decoder logits (N, L, V); labels as for
causal LMs (`kdistill.data.translation` describes the packing).

Evaluation: BLEU and chrF of beam and greedy outputs on the test split against the raw
reference texts (sacrebleu), teacher-forced perplexity and next-token agreement with the
teacher, size, and decoding speed in sentences per second. Decoding (`kdistill.tasks.decode`)
also makes sequence-level KD's targets (`decode`, `with_decoded_targets`)."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from kdistill.data.translation import EOS, PAD, TextCodec, replace_targets
from kdistill.errors import MissingDependencyError
from kdistill.models import count_parameters
from kdistill.tasks.base import Evaluation
from kdistill.tasks.causal_lm import CausalLM, lm_scores
from kdistill.tasks.decode import translate
from kdistill.types import DataSplits

if TYPE_CHECKING:  # type hints only: the config imports the tasks (their checks)
    from kdistill.config import RunConfig


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu's corpus BLEU (13a tokenisation) and chrF (character 6-grams, β = 2), 0..100."""
    try:
        import sacrebleu
    except ImportError:
        raise MissingDependencyError("data.name", "sacrebleu (BLEU / chrF)",
                                     "pip install 'kdistill[translate]'") from None
    return {"bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
            "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score)}


def _timed_translate(model: nn.Module, src: Tensor, **kwargs: Any) -> tuple[Tensor, float]:
    start = time.perf_counter()
    ids = translate(model, src, **kwargs)
    return ids, time.perf_counter() - start


def seq2seq_report(model: nn.Module, weights_path: Path, splits: DataSplits, *,
                   teacher_predictions: Tensor | None, beam: int, length_penalty: float,
                   batch_size: int, latency_sentences: int = 32) -> tuple[dict[str, Any],
                                                                           list[str]]:
    """One model's report row and its beam translations of the test sources.

    Row keys: bleu, chrf (beam `beam`), bleu_greedy, chrf_greedy; nll, perplexity, accuracy,
    agreement (teacher-forced next token, as for causal LMs); params, bytes; latency_ms (greedy,
    one sentence at a time, median over `latency_sentences` sentences), throughput (greedy
    sentences/s at `batch_size`), beam_throughput (beam sentences/s at `batch_size`)."""
    assert splits.tokenizer_json is not None, "seq2seq data carries its tokenizer"
    codec = TextCodec(splits.tokenizer_json)
    src, refs = splits.test_x[:, 0], list(splits.references)
    max_len = splits.test_x.shape[-1] - 1
    row: dict[str, Any] = lm_scores(model, splits.test_x, splits.test_y, batch_size=batch_size,
                                    teacher_predictions=teacher_predictions)
    beam_ids, beam_s = _timed_translate(model, src, beam=beam, max_len=max_len,
                                        length_penalty=length_penalty, batch_size=batch_size)
    greedy_ids, greedy_s = _timed_translate(model, src, beam=1, max_len=max_len,
                                            batch_size=batch_size)
    hyps = [codec.decode(r) for r in beam_ids]
    row.update(corpus_scores(hyps, refs))
    greedy = corpus_scores([codec.decode(r) for r in greedy_ids], refs)
    row.update({"bleu_greedy": greedy["bleu"], "chrf_greedy": greedy["chrf"], "beam": beam})
    one = []
    for i in range(min(latency_sentences, len(src))):
        one.append(_timed_translate(model, src[i : i + 1], beam=1, max_len=max_len)[1])
    row["latency_ms"] = statistics.median(one) * 1e3 if one else float("nan")
    row["throughput"] = len(src) / greedy_s
    row["beam_throughput"] = len(src) / beam_s
    row["params"] = count_parameters(model)
    row["bytes"] = weights_path.stat().st_size
    return row, hyps


def translation_samples(splits: DataSplits, hypotheses: dict[str, list[str]], *,
                        count: int) -> list[dict[str, str]]:
    """The first `count` test sentences: source and reference as the prompt, then each role's
    beam translation (its first seed), in the report's samples format."""
    assert splits.tokenizer_json is not None
    codec = TextCodec(splits.tokenizer_json)
    rows = []
    for i in range(min(count, len(splits.references))):
        source = codec.decode(splits.test_x[i, 0])
        rows.append({"prompt": f"{source} → reference: {splits.references[i]}",
                     **{role: hyps[i] for role, hyps in hypotheses.items()}})
    return rows


def _until_eos(row: Tensor) -> list[int]:
    """Decoded ids y1 .. yn (EOS and what follows dropped)."""
    ids = row.tolist()
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    return [i for i in ids if i != PAD]


class Seq2Seq(CausalLM):
    """Token conventions of causal LMs (shifted labels, ignored positions, the cache's (T, V)
    rows); its own evaluation (BLEU / chrF of decoded outputs) and decoding."""

    name: ClassVar[str] = "seq2seq"
    title: ClassVar[str] = "translation (seq2seq)"

    def describe(self, splits: DataSplits) -> str:
        return (f"{splits.name}: {len(splits.train_x)} train / {len(splits.val_x)} val / "
                f"{len(splits.test_x)} test sentence pairs, {splits.input_shape[1]} tokens per "
                f"side, joint BPE vocabulary {splits.num_classes:,}")

    def check_recipe(self, cfg: RunConfig) -> None:
        """The data brings its own BPE: nothing pretrained to compare it with."""

    def save_artifacts(self, splits: DataSplits, write: Callable[[str, str], None]) -> None:
        write("tokenizer.json", splits.tokenizer_json or "")  # to decode outputs later

    def test_row(self, model: nn.Module, weights: Path, reference: Tensor | None,
                 ev: Evaluation) -> tuple[dict[str, Any], Any]:
        e = ev.cfg.eval
        return seq2seq_report(model, weights, ev.splits, teacher_predictions=reference,
                              beam=e.beam, length_penalty=e.length_penalty,
                              batch_size=min(e.batch_size, ev.cfg.train.batch_size))

    def samples(self, ev: Evaluation, produced: dict[str, Any]) -> list[dict[str, str]]:
        return translation_samples(ev.splits, produced, count=ev.cfg.eval.samples)

    def decode(self, model: nn.Module, inputs: Tensor, *, beam: int, length_penalty: float,
               batch_size: int) -> Tensor:
        return translate(model, inputs[:, 0], beam=beam, max_len=inputs.shape[-1] - 1,
                         length_penalty=length_penalty, batch_size=batch_size)

    def with_decoded_targets(self, splits: DataSplits, ids: Tensor, key: str) -> DataSplits:
        # The key names the method ("seq_kd|<hash>"): the same fingerprint as before DataTools.
        fingerprint = hashlib.sha256(f"{splits.fingerprint}|{key}".encode()).hexdigest()
        return replace_targets(splits, [_until_eos(row) for row in ids], fingerprint)
