"""lmjax: train Llama-style language models with JAX on one CPU or a TPU pod."""

from lmjax.config import ConfigError, default_config, validate
from lmjax.mesh import RULES, make_mesh
from lmjax.model import Transformer
from lmjax.state import Setup, build, init_state
from lmjax.trained import TrainedRun, load
from lmjax.trainer import train
from lmjax import generate, hf, plan  # modules: lmjax.generate.generate, lmjax.hf.import_checkpoint, lmjax.plan.plan

__all__ = ["TrainedRun", "load", "ConfigError", "RULES", "Setup", "Transformer", "build", "default_config",
           "generate", "hf", "init_state", "make_mesh", "plan", "train", "validate"]
