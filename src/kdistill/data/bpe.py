"""A byte-level BPE tokenizer learned on a recipe's training documents (`kdistill tokenizer`).

A student with a vocabulary of its own (smaller than the teacher's, or fitted to the user's
text) is distilled through `arch: projected_lm` (`kdistill.models.cross_tokenizer`). The
vocabulary is learned on the training split only, so no validation or test text shapes it.
Byte-level (the GPT-2 alphabet of 256 bytes, no normalisation, no prefix space): every text
has a tokenization, and tokens map to bytes exactly, which the byte-level alignment of the two
tokenizations and bits per byte rely on. Trained by Hugging Face `tokenizers` (a dependency
of transformers), saved as a `transformers` tokenizer directory that `data.tokenizer` names.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdistill.errors import ConfigError

EOS = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 bytes and EOS
MAX_VOCAB = 1_000_000


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path, *,
              min_frequency: int = 2) -> Any:
    """Learn a byte-level BPE of `vocab_size` tokens (EOS included) on `texts` and save it to
    `out_dir` (a new or empty folder). Returns the `transformers` tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ConfigError("--vocab-size", f"{MIN_VOCAB} (the 256 bytes and EOS) to "
                                          f"{MAX_VOCAB:,}, got {vocab_size}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError("--out", f"{out_dir} exists and is not an empty folder; nothing is "
                                   "overwritten")
    try:  # before training: a folder that cannot be made must not cost the training time
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--out", f"cannot create {out_dir}: {exc.strerror}") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    wrapped.save_pretrained(str(out_dir))
    return wrapped
