"""Framework backends. Each is imported only when a stage needs it (`load`); they never import each other."""

from __future__ import annotations

import importlib
from typing import Literal, overload

from edgetl.backends.base import Backend, capabilities
from edgetl.backends.training import FinetuneBackend, missing

# Where each framework's parts live, by stage; imported only when a checkpoint of that framework is worked on.
MODULES = {"torch": "edgetl.backends.torch.backend", "keras": "edgetl.backends.keras.backend"}
FINETUNE_MODULES = {"torch": "edgetl.backends.torch.finetune", "keras": "edgetl.backends.keras.finetune"}


@overload
def load(framework: str, stage: Literal["export"] = "export") -> Backend: ...


@overload
def load(framework: str, stage: Literal["finetune"]) -> FinetuneBackend: ...


def load(framework: str, stage: str = "export") -> Backend | FinetuneBackend:
    """The framework's export `Backend`, or its fine-tuning module (checked against `FinetuneBackend`), imported
    only now; a missing extra is one UserError line."""
    from edgetl.errors import UserError
    from edgetl.ui import quiet_native

    capabilities(framework)
    name = (MODULES if stage == "export" else FINETUNE_MODULES)[framework]
    try:
        with quiet_native():  # torchao prints harmless "Failed to load ... mxfp8" lines on import
            module = importlib.import_module(name)
    except ImportError as error:
        raise UserError(f"the {framework} backend cannot be imported ({error}); install it with: "
                        f"pip install 'edgetl[{framework}]'") from None
    if stage == "export":
        return module.Backend()
    lacks = missing(module)
    if lacks:  # a backend's own defect, not the user's: a plain error that names every missing member
        raise TypeError(f"{name} is not a fine-tuning backend: it lacks {', '.join(lacks)}")
    return module
