"""Fine-tuning data from a teacher's generated answers: sequence-level KD (Kim & Rush 2016).

`kdistill generate` writes one JSON line per prompt (`{"id", "prompt", "response", ...}`);
`sft_splits` turns that file into a causal-LM `DataSplits` for the *student*. The student learns
to reproduce the teacher's whole answers (arXiv:1606.07947; the recipe behind DeepSeek-R1's
distilled models), which needs nothing of the teacher but its text: the records are
re-tokenised with the student's own tokenizer, so teacher and student may use different
vocabularies.

Each record becomes one row of `seq_len` tokens: the chat-formatted prompt (the student's chat
template with `add_generation_prompt=True`, exactly what the student will see at inference)
followed by the answer and its end-of-turn token (none when `max_new_tokens` cut the answer,
`"finished": false`). Labels are the ids on the answer tokens and
-100 on the prompt and the padding, so only the answer is trained on. Rows are right-padded or
truncated on the right. Records are split into train / validation / test by prompt `id` (all
answers to one prompt land in the same split) with the seeded permutation of `split_documents`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdistill.data.datasets import DataSplits
from kdistill.data.text import _check_fractions, _check_int, _tokenizer_digest, split_documents
from kdistill.errors import ConfigError
from kdistill.types import IGNORE_INDEX

# For tokenizers without a chat template (a base model, a tokenizer trained from scratch): a
# plain "role: text" transcript, so prompts and answers are still told apart.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


Message = dict[str, str]


def chat_text(tokenizer: Any, prompt: str | Sequence[Message], *, system: str | None,
              response: str | None = None) -> str:
    """The chat-formatted text of a prompt (ready for generation), or of prompt + response.

    `prompt` is the user's text, or a conversation (`[{"role", "content"}, ...]`, ending
    before the turn to answer); `system` is added first unless the conversation has its own.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return render_chat(tokenizer, messages, generation_prompt=response is None)


def render_chat(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool) -> str:
    """`messages` through the tokenizer's chat template (or the plain one when it has none)."""
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False,
        add_generation_prompt=generation_prompt)


def _end_of_turn(tokenizer: Any, answer_ids: list[int]) -> list[int]:
    if not answer_ids or answer_ids[-1] not in set(tokenizer.all_special_ids):
        answer_ids.append(tokenizer.eos_token_id)  # the plain template marks no end of turn
    return answer_ids


def encode_chat(tokenizer: Any, messages: Sequence[Message], *,
                where: str = "data.tokenizer") -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation: labels are the ids on every assistant turn (its text
    and end-of-turn token) and -100 elsewhere, so only the assistant's words are learnt.

    Each turn is tokenised separately, as `encode_pair` does for one: the text before an
    assistant turn is the template's rendering up to the generation prompt, exactly what the
    model sees at inference. The whitespace a template puts after an end-of-turn token is
    never predicted at inference, so it goes with the next (untrained) part.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:k], generation_prompt=True)
        full = render_chat(tokenizer, messages[:k + 1], generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head):
            raise ConfigError(where, "the tokenizer's chat template does not render a "
                                     "conversation turn by turn (a turn changes the text "
                                     "before it); use another tokenizer or one-turn rows")
        answer = full[len(head):].rstrip()
        context_ids = tokenizer(head[len(done):], add_special_tokens=False)["input_ids"]
        answer_ids = _end_of_turn(
            tokenizer, tokenizer(answer, add_special_tokens=False)["input_ids"])
        ids += context_ids + answer_ids
        labels += [IGNORE_INDEX] * len(context_ids) + answer_ids
        done = head + answer
    return ids, labels


def encode_pair(tokenizer: Any, prompt: str | Sequence[Message], response: str, *,
                system: str | None, finished: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids ending in an end-of-turn token) under the tokenizer's template.

    The two parts are tokenised separately so the prompt ids are exactly those the student gets
    at inference (tokenising the joined text could merge tokens across the boundary). An answer
    that generation cut off (`finished` false) gets no end-of-turn token: the student must not
    learn to stop mid-sentence.
    """
    head = chat_text(tokenizer, prompt, system=system)
    full = chat_text(tokenizer, prompt, system=system, response=response)
    if not full.startswith(head):
        raise ConfigError("data.tokenizer", "the tokenizer's chat template does not render a "
                                            "conversation as prompt + answer; use another one")
    # The template's trailing newline after the end-of-turn token is never predicted at
    # inference (generation stops at end-of-turn), so it is not trained on either.
    tail = full[len(head):].rstrip()
    if not finished and tail.startswith(response):
        tail = response  # the answer without the template's end-of-turn markup
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if finished:
        answer_ids = _end_of_turn(tokenizer, answer_ids)
    return prompt_ids, answer_ids


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a generated JSONL file; a malformed line is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(str(path), "generated file not found (run `kdistill generate` first)")
    records = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}:{number}", f"not a JSON line ({exc}); if generation "
                                  "was interrupted, resume `kdistill generate` to repair the "
                                  "file") from None
            if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in ("id", "response")
            ) or not (isinstance(record.get("prompt"), str) or is_conversation(
                    record.get("prompt"))):
                raise ConfigError(f"{path}:{number}", "expected an object with string fields "
                                                      "'id', 'prompt' (or a list of messages) "
                                                      "and 'response'")
            records.append(record)
    if not records:
        raise ConfigError(str(path), "holds no records")
    return records


def is_conversation(value: object) -> bool:
    """A list of {"role": str, "content": str} messages."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value)


def _rows(pairs: list[tuple[list[int], list[int]]], seq_len: int,
          pad_id: int) -> tuple[Tensor, Tensor]:
    """(N, seq_len) ids and labels of (prompt ids, answer ids) pairs; see `labelled_rows`."""
    return labelled_rows([(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in pairs], seq_len,
                         pad_id)


def labelled_rows(rows: list[tuple[list[int], list[int]]], seq_len: int,
                  pad_id: int) -> tuple[Tensor, Tensor]:
    """(N, seq_len) ids and labels of (ids, labels) rows, cut on the right and right-padded;
    rows with no trained token are dropped.

    Right padding needs no attention mask: attention is causal, so a real token never attends
    to the padding after it, and the padded positions carry label -100 (never trained on). This
    is why the padding goes on the right rather than the left.
    """
    ids, labels = [], []
    for row_ids, row_labels in rows:
        row, label = row_ids[:seq_len], row_labels[:seq_len]
        # Position t predicts label t + 1, so a label at position 0 is never scored.
        if all(v == IGNORE_INDEX for v in label[1:]):
            continue  # the prompt alone fills the row
        pad = seq_len - len(row)
        ids.append(row + [pad_id] * pad)
        labels.append(label + [IGNORE_INDEX] * pad)
    if not ids:
        return torch.empty(0, seq_len, dtype=torch.int64), torch.empty(0, seq_len,
                                                                       dtype=torch.int64)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)


def sft_splits(
    jsonl_path: str | Path,
    tokenizer: Any,
    *,
    seq_len: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    system: str | None,
    where: str,
) -> DataSplits:
    """A generated JSONL file as causal-LM fine-tuning splits for the student's tokenizer.

    Args:
        jsonl_path: the output of `kdistill generate`.
        tokenizer: the student's Hugging Face tokenizer (needs an EOS token).
        seq_len: tokens per row (T); longer conversations are cut on the right.
        val_fraction, test_fraction: fractions of the prompt ids held out, each in (0, 1).
        split_seed: seeds the permutation of the ids (split membership and order).
        system: the system message of the student's chat format (None: the template's default).
        where: the recipe section naming fields in errors (`data` -> `data.seq_len`, ...).
    """
    where = where.removesuffix(".name")
    _check_int(seq_len, f"{where}.seq_len", minimum=2)
    _check_int(split_seed, f"{where}.split_seed", minimum=-(2**63))
    _check_fractions(val_fraction, test_fraction, where)
    if tokenizer.eos_token_id is None:
        raise ConfigError(where, "the tokenizer has no EOS token to end an answer with")
    path = Path(jsonl_path)
    records = read_records(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id

    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:  # insertion order: the file's order, so the split is reproducible
        by_id.setdefault(record["id"], []).append(record)
    ids = list(by_id)
    train_idx, val_idx, test_idx = split_documents(
        len(ids), val_fraction, test_fraction, int(split_seed))

    tensors: dict[str, tuple[Tensor, Tensor]] = {}
    for split, order in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        pairs = [encode_pair(tokenizer, r["prompt"], r["response"], system=system,
                             finished=r.get("finished", True) is not False)
                 for i in order.tolist() for r in by_id[ids[i]]]
        tensors[split] = _rows(pairs, seq_len, pad_id)
        if len(tensors[split][0]) == 0:
            raise ConfigError(f"{where}.seq_len", f"no {split} row of {path} keeps an answer "
                              f"token within seq_len={seq_len} ({len(order)} prompts); raise "
                              f"{where}.seq_len or the split's fraction")

    params = {"seq_len": seq_len, "val_fraction": val_fraction, "test_fraction": test_fraction,
              "split_seed": split_seed, "system": system,
              # The folder's name, not its path (see text.lm_splits_from_documents), the
              # vocabulary and the chat template: what turns the same file into other ids.
              "tokenizer": Path(tokenizer.name_or_path or "").name,
              "vocab": _tokenizer_digest(tokenizer),
              "chat_template": str(getattr(tokenizer, "chat_template", None))}
    h = hashlib.sha256(f"sft|{sorted(params.items())}".encode())
    h.update(path.read_bytes())
    return DataSplits(
        name=path.stem,
        train_x=tensors["train"][0], train_y=tensors["train"][1],
        val_x=tensors["val"][0], val_y=tensors["val"][1],
        test_x=tensors["test"][0], test_y=tensors["test"][1],
        num_classes=len(tokenizer),
        input_shape=(seq_len,),
        fingerprint=h.hexdigest(),
        task="causal_lm",
    )
