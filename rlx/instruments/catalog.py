"""The built-in instruments: importing this module imports every module of the `rlx.instruments` package, each of
which registers the instruments it defines (`@register_instrument`). A new instrument is a module (or a package)
under rlx/instruments/; nothing here changes.

Imported by the factory that builds instruments (`rlx.run.build_instruments`), never by `rlx.instruments.base`,
which every instrument imports.
"""

import importlib
import pkgutil

import rlx.instruments as _package
from rlx.instruments.base import _REGISTRY, Instrument

NOT_INSTRUMENT_MODULES = ("base", "catalog")
"""Modules of the package that define no instrument and must not be imported from here (the seam; this module)."""


def instrument_modules() -> list[str]:
    """Every module and subpackage of `rlx.instruments` but the seam and the catalog, sorted by name."""
    names = sorted(m.name for m in pkgutil.iter_modules(_package.__path__))
    return [f"{_package.__name__}.{n}" for n in names if n not in NOT_INSTRUMENT_MODULES]


for _module in instrument_modules():
    importlib.import_module(_module)


def registered_instruments() -> dict[str, type[Instrument]]:
    """Name -> class of every registered instrument: the built-in ones and any registered before the call."""
    return dict(_REGISTRY)
