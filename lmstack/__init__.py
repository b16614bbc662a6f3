"""lmstack: the whole language-model lifecycle in one PyTorch package.

Public API:
    load_model(path_or_preset)  -> Transformer   (a Hugging Face / lmstack directory, or a preset name)
    save_model(model, path)                       (an atomic Hugging Face directory)
    generate(model, tokenizer_or_None, prompts, **options) -> GenerationOutput   (lmstack.generate package)
    ModelConfig, Transformer, preset
"""

from lmstack.config import PRESETS, ModelConfig, preset
from lmstack.interop.hf import load_model, save_model
from lmstack.model.transformer import Transformer
from lmstack.generate.api import generate  # after the subpackage import: lmstack.generate is the function

__version__ = "0.1.0"

__all__ = ["PRESETS", "ModelConfig", "Transformer", "generate", "load_model", "preset", "save_model", "__version__"]
