"""lmjax: train Llama-style language models with JAX on one CPU or a TPU pod."""

from lmjax.config import ConfigError, default_config, validate
from lmjax.load import TrainedRun, load
from lmjax.mesh import RULES, make_mesh
from lmjax.model import Transformer
from lmjax.train import Setup, build, init_state, train
from lmjax import hf, plan  # modules: lmjax.hf.import_checkpoint, lmjax.plan.plan

__all__ = ["TrainedRun", "load", "ConfigError", "RULES", "Setup", "Transformer", "build", "default_config",
           "hf", "init_state", "make_mesh", "plan", "train", "validate"]
