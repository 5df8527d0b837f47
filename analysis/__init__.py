"""Offline analysis of rlx run directories."""
