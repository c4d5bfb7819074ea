"""decoupled: pipeline-parallel training without end-to-end backprop.

From Python (a notebook, a sweep script)::

    import decoupled
    from decoupled import Config, DigitsData, MLPModel, DGLMethod, SplitConfig, TrainConfig

    cfg = Config(data=DigitsData(name="digits"), model=MLPModel(name="mlp", hidden=[64, 64]),
                 method=DGLMethod(name="dgl"), split=SplitConfig(stages=3), train=TrainConfig(epochs=3))
    summary = decoupled.train(cfg)                       # or a dict, or Config.from_yaml("configs/x.yaml")
    result = decoupled.compare(Config.from_yaml("configs/quickstart.yaml").override("train.epochs=2"))
"""

from __future__ import annotations

from .compare import compare
from .config import (
    BackpropMethod,
    CheckpointConfig,
    Cifar10Data,
    ClusterConfig,
    CompareConfig,
    Config,
    ConfigError,
    DFAMethod,
    DGLMethod,
    DigitsData,
    DNICNNModel,
    DNIMethod,
    FAMethod,
    IdxData,
    ImageFolderData,
    LinksConfig,
    MLPModel,
    OptimizerConfig,
    OutputConfig,
    RecoveryConfig,
    ResNetModel,
    SignSymmetricMethod,
    SplitConfig,
    SyntheticData,
    TrainConfig,
    VGGModel,
    build_config,
    load_config,
)
from .train import resume, train

__all__ = [
    "BackpropMethod", "CheckpointConfig", "Cifar10Data", "ClusterConfig", "CompareConfig", "Config", "ConfigError",
    "DFAMethod", "DGLMethod", "DNICNNModel", "DNIMethod", "DigitsData", "FAMethod", "IdxData", "ImageFolderData",
    "LinksConfig", "MLPModel", "OptimizerConfig", "OutputConfig", "RecoveryConfig", "ResNetModel",
    "SignSymmetricMethod", "SplitConfig", "SyntheticData", "TrainConfig", "VGGModel", "build_config", "compare",
    "load_config", "resume", "train",
]
__version__ = "0.1.0"
