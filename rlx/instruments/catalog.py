"""Importing this module registers every built-in instrument. Add one import per instrument module."""

import rlx.alignment.instrument  # noqa: F401,E402
import rlx.instruments.activations  # noqa: F401,E402
import rlx.regularizers.relax  # noqa: F401,E402
import rlx.regularizers.token_level  # noqa: F401,E402
