"""sparseforge: make transformer language models sparse, small and fast, and measure it."""

__version__ = "0.1.0"

from sparseforge.api import compress, evaluate, load, load_tokenizer, save  # noqa: E402
from sparseforge.core.dispatch import restore_dense, use_sparse_kernel  # noqa: E402
from sparseforge.errors import UserInputError  # noqa: E402
from sparseforge.recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["compress", "evaluate", "load", "load_tokenizer", "save", "load_recipe", "Recipe", "use_sparse_kernel", "restore_dense", "UserInputError", "__version__"]
