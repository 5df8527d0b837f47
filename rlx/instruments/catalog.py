"""The built-in instruments: importing this module registers every one. Add one import per instrument module.

Imported by the factory that builds instruments (`rlx.run.build_instruments`), never by `rlx.instruments.base`,
which every instrument imports.
"""

import rlx.instruments.grad_alignment  # noqa: F401
import rlx.instruments.activations  # noqa: F401
import rlx.instruments.covariance  # noqa: F401
import rlx.instruments.entropy  # noqa: F401
import rlx.instruments.relax  # noqa: F401
from rlx.instruments.base import _REGISTRY, Instrument


def registered_instruments() -> dict[str, type[Instrument]]:
    """Name -> class of every registered instrument: the built-in ones and any registered before the call."""
    return dict(_REGISTRY)
