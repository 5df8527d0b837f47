"""What instruments write under `<output_dir>/diagnostics/` and how (see `manifest.py`)."""

from rlx.diagnostics.manifest import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DiagnosticsWriter,
    read_manifest,
    read_table,
)

__all__ = [
    "LEGACY_MANIFEST_NAME",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "DiagnosticsWriter",
    "read_manifest",
    "read_table",
]
