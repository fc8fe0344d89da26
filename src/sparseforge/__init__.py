"""sparseforge: make transformer language models sparse, small and fast, and measure it."""

__version__ = "0.1.0"

from sparseforge.api import attach_method, attach_runtime, compress, detach_runtime, evaluate, finetune, load, load_tokenizer, runtime_stages, save  # noqa: E402
from sparseforge.core.dispatch import restore_dense, use_sparse_kernel  # noqa: E402
from sparseforge.errors import UserInputError  # noqa: E402
from sparseforge.recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["compress", "evaluate", "finetune", "load", "load_tokenizer", "save", "attach_runtime", "detach_runtime", "runtime_stages", "attach_method", "load_recipe", "Recipe", "use_sparse_kernel", "restore_dense", "UserInputError", "__version__"]
