"""Conversations for fine-tuning and distilling a causal LM (`data.name: chat`).

A table (usually JSON Lines) whose rows are either conversations, a `messages` column holding
`[{"role": "system" | "user" | "assistant", "content": "..."}, ...]`, or `prompt` /
`completion` pairs (a one-turn conversation). Each row becomes one row of `seq_len` tokens in
the student's chat format (`kdistill.data.sft.encode_chat`): labels are the token ids on the
assistant's turns and -100 elsewhere (system, user, padding), so the loss covers the
assistant's words only, exactly like the built-in `generated` data (`kdistill.data.sft`);
rows are cut on the right and right-padded. Token-level methods (`token_kd`) then compare
teacher and student on the assistant tokens; `kdistill generate` over the prompts of such a
file gives sequence-level KD.

`read_conversation` also checks a prompt file's rows (`kdistill.data.prompts.read_prompt_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from kdistill.data import text as text_data
from kdistill.data.builtin import Tokenizer, _tokenizer
from kdistill.data.sft import Message, encode_chat, labelled_rows
from kdistill.data.source import LoadContext
from kdistill.data.splitting import FileSplits, duplicate_notes, file_digest, fingerprint
from kdistill.data.tables import SplitRows, Table, assign_rows, read_split_tables
from kdistill.errors import ConfigError
from kdistill.types import DataSplits

ROLES = ("system", "user", "assistant", "tool")
CHAT_COLUMNS = ("messages", "prompt", "completion")


def read_conversation(value: object, where: str, *, prompt_only: bool = False) -> list[Message]:
    """A row's `messages` checked: a list of {"role", "content"} with known roles, holding an
    assistant turn (or, for a prompt, not ending with one)."""
    if not isinstance(value, list) or not value:
        raise ConfigError(where, "'messages' must be a non-empty list of {role, content}")
    messages = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ConfigError(where, f"messages[{k}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise ConfigError(where, f"messages[{k}] has role {m.get('role')!r}; expected one "
                                     f"of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    if prompt_only and messages[-1]["role"] == "assistant":
        raise ConfigError(where, "a prompt ends before the assistant's turn; remove the last "
                                 "(assistant) message")
    if not prompt_only and not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(where, "has no assistant turn to learn from (a file of prompts "
                                 "alone is for `kdistill generate`)")
    return messages


def _check_columns(table: Table) -> None:
    if "messages" not in table.columns and not {"prompt", "completion"} <= set(table.columns):
        raise ConfigError(str(table.path), f"needs a 'messages' column, or 'prompt' and "
                                           f"'completion' columns (columns: "
                                           f"{', '.join(table.columns) or 'none'})")


def conversations(rows: SplitRows, system: str | None) -> list[list[Message]]:
    """The rows as conversations, `system` first where a row has no system message. A row is
    its `messages`, or else its `prompt` and `completion` (a file may mix the two)."""
    _check_columns(rows.table)
    columns = {c: rows.column(c) for c in CHAT_COLUMNS if c in rows.table.columns}
    out = []
    for k in range(len(rows)):
        where = rows.locate(k)
        if columns.get("messages", [None] * len(rows))[k] is not None:
            messages = read_conversation(columns["messages"][k], where)
        elif "prompt" in columns and "completion" in columns:
            prompt, answer = columns["prompt"][k], columns["completion"][k]
            for field, v in (("prompt", prompt), ("completion", answer)):
                if not isinstance(v, str) or not v.strip():
                    raise ConfigError(where, f"column '{field}' is {v!r}; expected text")
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer}]
        else:
            raise ConfigError(where, "has neither 'messages' nor 'prompt' and 'completion'")
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        out.append(messages)
    return out


class ChatRows(FileSplits):
    """Chat data for fine-tuning / distilling a causal LM: `messages` conversations or
    `prompt` / `completion` pairs, in the tokenizer's chat format; the loss covers the
    assistant's tokens only."""

    name: Literal["chat"]
    task = "causal_lm"
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=2)] = Field(
        256, description="tokens per row (longer conversations are cut on the right)")
    system: str | None = Field(None, description="system message for rows without one "
                                                 "(null: the chat template's default)")

    def load(self, ctx: LoadContext) -> DataSplits:
        where = ctx.where
        tables = read_split_tables(self, [], CHAT_COLUMNS, where=where)
        for table in tables.values():
            _check_columns(table)
        rows = assign_rows(self, tables, where=where, what="conversations")
        tokenizer = _tokenizer(self.tokenizer, f"{where}.tokenizer")
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{where}.tokenizer", "the tokenizer has no EOS token to end an "
                                                    "answer with")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        tensors: dict[str, Any] = {}
        keys: dict[str, list[str]] = {}
        dropped = 0
        for split, part in rows.items():
            chats = conversations(part, self.system)
            keys[split] = [repr(c) for c in chats]
            encoded = [encode_chat(tokenizer, c, where=f"{where}.tokenizer") for c in chats]
            tensors[split] = labelled_rows(encoded, self.seq_len, pad_id)
            dropped += len(chats) - len(tensors[split][0])
            if len(tensors[split][0]) == 0:
                raise ConfigError(f"{where}.seq_len", f"no {split} conversation keeps an "
                                  f"assistant token within seq_len={self.seq_len} "
                                  f"({len(chats)} rows); raise seq_len")
        notes = duplicate_notes(keys, "conversations")
        if dropped:
            notes += (f"data: {dropped} conversation(s) dropped: the text before the first "
                      f"answer fills seq_len={self.seq_len}",)
        params = {"seq_len": self.seq_len, "system": self.system,
                  "split": [self.split_seed, sorted(tables),
                            *(self.holdout(s) for s in ("val", "test") if s not in tables)],
                  "vocab": text_data._tokenizer_digest(tokenizer),
                  "chat_template": str(getattr(tokenizer, "chat_template", None))}
        digests = [file_digest(Path(p)) for p in (self.path, self.val_path, self.test_path) if p]
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
            tensors["train"], tensors["val"], tensors["test"])
        return DataSplits(
            name=Path(self.path).stem, train_x=train_x, train_y=train_y, val_x=val_x,
            val_y=val_y, test_x=test_x, test_y=test_y, num_classes=len(tokenizer),
            input_shape=(self.seq_len,), task="causal_lm", notes=notes,
            fingerprint=fingerprint("chat", params, digests, train_x, train_y))
