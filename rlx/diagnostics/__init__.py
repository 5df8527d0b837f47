"""The old name of `rlx.storage` (the writer of `<run_dir>/diagnostics/` and its manifest), kept only until the last
imports of it move to `rlx.storage`: "diagnostics" names the config section and the run's folder, not a package."""

from rlx.storage import (
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
