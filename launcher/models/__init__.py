"""Models the recipes build by name.

- `builtin`: `build_model`: `mlp`, `cnn`, `resnet`, or a user's `module.path:factory`;
- `hf`: `--model hf:NAME_OR_PATH`: transformers image and text classifiers, their tokenizers and image
  processors, and the `final/hf/` export (transformers is imported only when an `hf:` model is asked for).
"""

from launcher.models.builtin import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "build_model"]
