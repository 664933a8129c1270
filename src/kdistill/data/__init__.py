"""Built-in real data sets (offline): MNIST, Fashion-MNIST, sklearn digits, MNIST-1D."""

from kdistill.data.datasets import DATASETS, DataSplits, RawData, load_dataset

__all__ = ["DATASETS", "DataSplits", "RawData", "load_dataset"]
