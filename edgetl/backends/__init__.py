"""Framework backends. Each is imported only when a stage needs it (`load`); they never import each other."""

from __future__ import annotations

import importlib

from edgetl.backends.base import Backend, capabilities

# Where each framework's Backend lives; imported only when a checkpoint of that framework is worked on.
MODULES = {"torch": "edgetl.backends.torch.backend", "keras": "edgetl.backends.keras.backend"}


def load(framework: str) -> Backend:
    """The framework's backend, imported only now; a missing extra is one UserError line."""
    from edgetl.errors import UserError
    from edgetl.ui import quiet_native

    capabilities(framework)
    try:
        with quiet_native():  # torchao prints harmless "Failed to load ... mxfp8" lines on import
            module = importlib.import_module(MODULES[framework])
    except ImportError as error:
        raise UserError(f"the {framework} backend cannot be imported ({error}); install it with: "
                        f"pip install 'edgetl[{framework}]'") from None
    return module.Backend()
