"""Importing this module registers every built-in instrument. Add one import per instrument module."""
import rlx.instruments.activations  # noqa: F401,E402
