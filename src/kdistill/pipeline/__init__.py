"""`kdistill run` as a short stage order (`order.run`), its stages (`stages`) and
`kdistill generate` (`generate`)."""

from kdistill.pipeline.order import RunResult, run

__all__ = ["RunResult", "run"]
