"""The one training loop: `train()` (`loop`), what it accepts (`inputs`: `LoopSettings`, any
iterable of batches, a plain teacher network), where it runs (`placement`: `place`, the device
and precision; `precision`: autocast and fp16's scaler; `sharding`: FSDP2), the forward a step
runs (`step`), its setup (`setup`) and what a resume needs (`resume`). Every method, the
baseline and the teacher go through `train()`, and every optimiser step of a run happens in
it."""

from kdistill.engine.inputs import LoopSettings
from kdistill.engine.loop import train
from kdistill.engine.placement import place
from kdistill.engine.resume import TrainState

__all__ = ["LoopSettings", "TrainState", "place", "train"]
