"""The one training loop: `train()` (`loop`), what it accepts (`inputs`: `LoopSettings`, any
iterable of batches, a plain teacher network), the forward a step runs (`forward`) and what a
resume needs (`resume`). Every method, the baseline and the teacher go through `train()`, and
every optimiser step of a run happens in it."""

from kdistill.engine.inputs import LoopSettings
from kdistill.engine.loop import train
from kdistill.engine.resume import TrainState

__all__ = ["LoopSettings", "TrainState", "train"]
