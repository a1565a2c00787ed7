"""Training recipes' library: configs, feature cache, data, trainer (see ``recipes/README.md``).

Public API::

    from omnivox.training import TrainConfig, load_train_config, train, Trainer, FeatureCache
    from omnivox.training.cli import add_train_arguments, run_train, add_cache_arguments, run_cache
"""

from omnivox.training.config import ConfigError, TrainConfig, load_train_config
from omnivox.training.features import FeatureCache
from omnivox.training.trainer import Trainer, TrainResult, train

__all__ = ["ConfigError", "FeatureCache", "TrainConfig", "TrainResult", "Trainer", "load_train_config", "train"]
