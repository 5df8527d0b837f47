"""Importing this module registers every built-in instrument. Add one import per instrument module."""
