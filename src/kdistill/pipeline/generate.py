"""`kdistill generate`: run a teacher over a prompt set and keep its answers (sequence-level KD).

Sequence-level KD (Kim & Rush 2016, arXiv:1606.07947; DeepSeek-R1's distilled models) trains the
student on the teacher's own outputs instead of its per-token distributions. Step one, here:
generate the answers once, in batches, and write them as JSONL, one line per prompt:
`{"id", "prompt", "response", "reference", "teacher", "params", "new_tokens", "finished"}`
(`finished`: the teacher ended its answer, rather than `max_new_tokens` cutting it). Step two is
ordinary fine-tuning on that file (`kdistill.data.sft.sft_splits`), with any student tokenizer.

Resumable: lines are appended and flushed + fsync'ed after every batch, so a crash loses at most
the batch in flight; a torn last line (no newline) is cut off on the next start. Prompts whose id
is already in the file are skipped. Batches are always the same chunks of the prompt list and
each batch's sampling seed derives from `seed` and its first prompt id, so a resumed run writes
exactly the file an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill import devices
from kdistill.config.generate import GenerateConfig
from kdistill.data.prompts import Prompt
from kdistill.data.sft import chat_text
from kdistill.errors import ConfigError
from kdistill.models.hf import _transformers, load_tokenizer, resolve_source

# --- the output file -----------------------------------------------------------------------


def _params(*, max_new_tokens: int, do_sample: bool, batch_size: int, temperature: float,
            top_p: float, top_k: int, seed: int, system: str | None,
            prompt_format: str = "chat") -> dict[str, Any]:
    """The settings every line records: a resumed run must use the same ones."""
    return {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "batch_size": batch_size,
            "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
            "system": system, "prompt_format": prompt_format}


def _recipe_params(cfg: GenerateConfig) -> dict[str, Any]:
    s = cfg.sampling
    return _params(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                   batch_size=cfg.batch_size, temperature=s.temperature, top_p=s.top_p,
                   top_k=s.top_k, seed=s.seed, system=cfg.system,
                   prompt_format=cfg.prompt_format)


def _read_done(out_path: Path, params: dict[str, Any], teacher: str, *,
               truncate: bool = True) -> dict[str, Any]:
    """Ids already answered in `out_path`, each with the prompt it answered, after cutting off
    a torn last line (unless `truncate` is false: `kdistill validate` only reads).

    Every line must come from the same teacher and parameters: mixing answers of two settings in
    one file would silently blend two data sets.
    """
    if not out_path.exists():
        return {}
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1
    done: dict[str, Any] = {}
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_id, record_params = record["id"], record["params"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ConfigError(f"{out_path}:{number}", "not a line written by `kdistill "
                              "generate`; use another output file") from None
        theirs = {**record_params, "teacher": record.get("teacher")} \
            if isinstance(record_params, dict) else {}
        ours = {**params, "teacher": teacher}
        changed = [f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}"
                   for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        if changed:
            raise ConfigError("output.path", f"{out_path}:{number} was generated with other "
                              f"settings ({', '.join(changed)}); use another output file "
                              "(output.path=...) to keep both")
        done[record_id] = record.get("prompt")
    # A last line without its newline was being written when the process died: cut it off,
    # but only once every whole line proved the file ours (never cut a stranger's file).
    if end < len(data) and truncate:
        if not data[end:].startswith(b"{"):
            raise ConfigError(f"{out_path}", "does not end like a file written by `kdistill "
                              "generate`; use another output file")
        with out_path.open("r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return done


def _check_same_prompts(prompts: list[Prompt], done: dict[str, Any], out_path: Path) -> None:
    """A resumed file must have answered these very prompts: ids are positions in some prompt
    sets (a run recipe's training documents), so another split or prefix would otherwise be
    taken as done, and the file would keep the other prompts' answers."""
    for p in prompts:
        if p.id in done and done[p.id] != p.prompt:
            raise ConfigError("output.path", f"{out_path} answered prompt {p.id!r} for another "
                              "prompt text (the prompt set changed: another split, file or "
                              "prefix); use another output file (output.path=...)")


def _append(out_path: Path, records: list[dict[str, Any]]) -> None:
    # One write of whole lines, then fsync: after a crash the file ends at a batch boundary or
    # with one torn line, which the next start cuts off.
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with out_path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# --- generation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateResult:
    """What one `generate` call did: prompts answered now / found done, tokens, speed."""

    out_path: Path
    n_prompts: int
    n_generated: int
    n_skipped: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _batch_seed(seed: int, first_id: str) -> int:
    digest = hashlib.sha256(f"{seed}|{first_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _load_teacher(model_path: str) -> Any:
    directory, gguf = resolve_source(model_path, where="teacher.path")
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = _transformers("teacher.path").AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=torch.float32, **kwargs)
    return model.eval()


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the model's generation config's and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    if not ids:
        raise ConfigError("teacher.path", "the tokenizer has no EOS token to stop generation")
    return sorted(set(ids))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Left padding: every prompt then ends at the last column, where generation appends. Done
    # here rather than by the (shared, cached) tokenizer so its padding side is never changed.
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    return ids, mask


@dataclass
class _Teacher:
    """The loaded teacher with its tokenizer and generation settings: answers one batch."""

    path: str
    model: Any
    device: torch.device
    tokenizer: Any
    config: Any  # transformers.GenerationConfig
    stop: list[int]
    pad_id: int
    params: dict[str, Any]

    @classmethod
    def load(cls, path: str, params: dict[str, Any], device: torch.device) -> _Teacher:
        tokenizer = load_tokenizer(path, where="teacher.path")
        model = _load_teacher(path).to(device)
        stop = _stop_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
        p = params
        sampling = dict(do_sample=True, temperature=p["temperature"], top_p=p["top_p"],
                        top_k=p["top_k"]) if p["do_sample"] else dict(
            do_sample=False, temperature=None, top_p=None, top_k=None)
        config = _transformers().GenerationConfig(
            max_new_tokens=p["max_new_tokens"], eos_token_id=stop, pad_token_id=pad_id,
            **sampling)
        return cls(path, model, device, tokenizer, config, stop, pad_id, params)

    def answer(self, batch: list[Prompt], done: Collection[str]
               ) -> tuple[list[dict[str, Any]], int]:
        """The records of the prompts of `batch` not in `done`, and the new tokens generated
        (for the whole batch: its composition is fixed, so a resumed batch is decoded again)."""
        text_format = self.params["prompt_format"] == "text"
        texts = [_plain(p) if text_format else
                 chat_text(self.tokenizer, p.prompt, system=self.params["system"]) for p in batch]
        # The chat template writes its own BOS; a plain-text prompt gets the tokenizer's own.
        rows = self.tokenizer(texts, add_special_tokens=text_format)["input_ids"]
        ids, mask = _left_pad(rows, self.pad_id)
        gpus = [self.device] if self.device.type == "cuda" else []
        # fork_rng: the batch's own seed, and the caller's global RNG left as it was.
        with torch.random.fork_rng(devices=gpus), torch.inference_mode():
            torch.manual_seed(_batch_seed(self.params["seed"], batch[0].id))
            out = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      generation_config=self.config).cpu()
        records, batch_tokens = [], 0
        for prompt, row in zip(batch, out[:, ids.shape[1]:].tolist(), strict=True):
            # Tokens up to and including the first stop token; the rest is padding.
            n = next((i + 1 for i, t in enumerate(row) if t in self.stop), len(row))
            # Cut by max_new_tokens rather than ended by the teacher: the student must not
            # learn to stop there (sft_splits trains no end-of-turn token for it).
            finished = row[n - 1] in self.stop
            batch_tokens += n
            if prompt.id in done:
                continue  # the batch's first lines were written before a crash
            response = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            # A continuation keeps its leading space: it joins the prompt mid-sentence.
            record = {"id": prompt.id, "prompt": prompt.prompt,
                      "response": response if text_format else response.strip(),
                      "reference": prompt.reference, "teacher": self.path,
                      "params": self.params, "new_tokens": n, "finished": finished}
            if text_format:  # a whole document, for `data: {name: text_files}`
                record["text"] = f"{prompt.prompt}{response}"
            records.append(record)
        return records, batch_tokens


def _plain(prompt: Prompt) -> str:
    if not isinstance(prompt.prompt, str):
        raise ConfigError("prompt_format", f"text continues plain-text prompts; prompt "
                          f"{prompt.id!r} is a conversation (use prompt_format: chat)")
    return prompt.prompt


def generate(
    model_path: str,
    prompts: list[Prompt],
    out_path: Path,
    *,
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    seed: int,
    system: str | None,
    threads: int | None,
    device: str = "auto",
    prompt_format: str = "chat",
    echo: Callable[[str], None] = lambda line: None,
) -> GenerateResult:
    """Answer every prompt not yet in `out_path` with the teacher; append one JSON line each.

    Args:
        model_path: "smollm2", a model directory or a .gguf file (never downloaded).
        prompts: the prompts, in the order they are batched and written.
        out_path: the JSONL file; created, or resumed when it exists.
        batch_size: prompts per `generate` call (left-padded together).
        max_new_tokens, do_sample, temperature, top_p, top_k: sampling; greedy when
            `do_sample` is false (temperature, top_p and top_k are then unused).
        seed: with the batch's first prompt id, seeds each batch's sampling.
        system: the system message (None: the chat template's default).
        prompt_format: "chat" (a user turn in the chat template) or "text" (plain text the
            teacher continues; each record then also holds `text`, prompt + response).
        threads: torch intra-op threads while generating (None: leave as is).
        device: where the teacher generates (`kdistill.devices.resolve`).
        echo: receives one progress line per batch.
    """
    params = _params(max_new_tokens=max_new_tokens, do_sample=do_sample, batch_size=batch_size,
                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, system=system,
                     prompt_format=prompt_format)
    if len({p.id for p in prompts}) != len(prompts):
        raise ConfigError("prompts", "prompt ids must be unique (resume keys on them)")
    if prompt_format == "text":  # before the teacher loads: a conversation fails at once
        for p in prompts:
            _plain(p)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(out_path, params, model_path)
    _check_same_prompts(prompts, done, out_path)
    # Fixed chunks of the full list: a batch's composition (hence its padding and its output)
    # never depends on what an earlier run already wrote.
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    todo = [b for b in batches if any(p.id not in done for p in b)]
    skipped = sum(p.id in done for p in prompts)
    if not todo:
        echo(f"all {len(prompts)} prompts already answered in {out_path}")
        return GenerateResult(out_path, len(prompts), 0, skipped, 0, 0.0)

    t_load = time.perf_counter()
    teacher = _Teacher.load(model_path, params, devices.resolve(device, where="teacher.device"))
    echo(f"teacher {model_path} loaded in {time.perf_counter() - t_load:.1f} s; "
         f"{len(todo)} batch(es) to generate, {skipped} prompt(s) already done")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    n_generated = new_tokens = 0
    seconds = 0.0
    try:
        for number, batch in enumerate(todo, start=1):
            t0 = time.perf_counter()
            records, batch_tokens = teacher.answer(batch, done)
            elapsed = time.perf_counter() - t0
            _append(out_path, records)
            n_generated += len(records)
            new_tokens += batch_tokens
            seconds += elapsed
            echo(f"batch {number}/{len(todo)}: {len(batch)} prompts, {batch_tokens} new tokens "
                 f"in {elapsed:.1f} s ({batch_tokens / max(elapsed, 1e-9):.1f} tokens/s)")
    finally:
        torch.set_num_threads(old_threads)
    return GenerateResult(out_path, len(prompts), n_generated, skipped, new_tokens, seconds)


def validate_generate(cfg: GenerateConfig) -> str:
    """What `kdistill validate` checks of a generate recipe, without loading the teacher's
    weights: the prompt set, the teacher's files and tokenizer, and that an existing output
    file was written with these settings. Returns a one-line summary."""
    prompts = cfg.prompts.load(where="prompts")
    devices.resolve(cfg.teacher.device, where="teacher.device")
    resolve_source(cfg.teacher.path, where="teacher.path")
    load_tokenizer(cfg.teacher.path, where="teacher.path")
    done = _read_done(Path(cfg.output.path), _recipe_params(cfg), cfg.teacher.path,
                      truncate=False)
    _check_same_prompts(prompts, done, Path(cfg.output.path))
    return (f"{len(prompts)} prompts ({len(done)} already answered in {cfg.output.path}), "
            f"teacher {cfg.teacher.path}")


def run_generate(cfg: GenerateConfig, *,
                 echo: Callable[[str], None] = lambda line: None) -> GenerateResult:
    """The `kdistill generate` command: load the prompts named by the recipe and generate."""
    prompts = cfg.prompts.load(where="prompts")
    s = cfg.sampling
    return generate(cfg.teacher.path, prompts, Path(cfg.output.path),
                    batch_size=cfg.batch_size, max_new_tokens=s.max_new_tokens,
                    do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p,
                    top_k=s.top_k, seed=s.seed, system=cfg.system, threads=cfg.threads,
                    device=cfg.teacher.device, prompt_format=cfg.prompt_format, echo=echo)
