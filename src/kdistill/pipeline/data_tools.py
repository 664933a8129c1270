"""`DataTools` for `Method.prepare_data` (`kdistill.methods.base`): the run's storage for what a
method computes once, and the task's decoding (seq2seq: beam search). A stand-in written with
the methods' side of the contract; the pipeline owner may replace it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from kdistill.cache import fingerprint_model
from kdistill.data.translation import EOS, PAD, replace_targets
from kdistill.io import save_tensors_atomic
from kdistill.tasks.decode import translate
from kdistill.types import DataSplits, Echo


@dataclass
class RunDataTools:
    """`directory`: the method's own place in the run (written atomically, read back)."""

    directory: Path
    echo: Echo

    def fingerprint(self, model: nn.Module) -> str:
        return fingerprint_model(model)

    def cached_tensors(self, name: str, make: Callable[[], dict[str, Tensor]]
                       ) -> dict[str, Tensor]:
        path = self.directory / f"{name}.safetensors"
        if path.is_file():
            self.echo(f"{name.split('-')[0]}: found in the run ({path.name})")
            return load_file(str(path))
        tensors = make()
        save_tensors_atomic(tensors, path)  # a killed run never tears it
        return tensors

    def decode(self, model: nn.Module, inputs: Tensor, *, beam: int, length_penalty: float,
               batch_size: int) -> Tensor:
        return translate(model, inputs[:, 0], beam=beam, max_len=inputs.shape[-1] - 1,
                         length_penalty=length_penalty, batch_size=batch_size)

    def with_decoded_targets(self, splits: DataSplits, ids: Tensor, key: str) -> DataSplits:
        fingerprint = hashlib.sha256(f"{splits.fingerprint}|{key}".encode()).hexdigest()
        return replace_targets(splits, [until_eos(row) for row in ids], fingerprint)


def until_eos(row: Tensor) -> list[int]:
    """Decoded ids y1 .. yn (EOS and what follows dropped)."""
    ids = row.tolist()
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    return [i for i in ids if i != PAD]
