"""mcserve models: the Memory Caching recurrent LM (docs/design.md section 1).

Public API, used by the engine, the trainer and the tests:

    import models
    model = models.build(config_or_dict, seed=0)   # random initialisation
    models.save(model, "dir/")                      # config.json, model.safetensors, tokenizer
    model = models.load("dir/")                     # checked; errors name the file and tensor
    logits = model(tokens)                          # parallel/chunked, differentiable
    logits = model.naive_forward(tokens)            # token-loop reference
    state = model.new_state(batch)
    logits = model.prefill(tokens, state)           # any split, from any state
    logits = model.decode(next_tokens, state)       # one token per sequence
    model.save_state(state, "s.safetensors"); state = model.load_state("s.safetensors")
    model.fingerprint                               # hash of config + weights
"""

from pathlib import Path

from .config import AGGREGATIONS, BOUNDARIES, MEMORIES, ConfigError, ModelConfig
from .io import ModelLoadError, build, load, save
from .model import MCModel
from .state import LayerState, MCState, StateError
from .tokenizer import Tokenizer, TokenizerError, byte_tokenizer

__all__ = [
    "AGGREGATIONS", "BOUNDARIES", "MEMORIES", "ConfigError", "ModelConfig", "ModelLoadError",
    "build", "load", "save", "MCModel", "LayerState", "MCState", "StateError",
    "Tokenizer", "TokenizerError", "byte_tokenizer", "DEFAULT_MODEL", "default_model_path",
]

DEFAULT_MODEL = "mc-gla-grm-small"


def default_model_path() -> Path:
    """The bundled model, shipped inside the package (models/weights/)."""
    return Path(__file__).parent / "weights" / DEFAULT_MODEL
