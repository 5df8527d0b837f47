"""What instruments write under `<output_dir>/diagnostics/` and how (see `manifest.py`)."""

from rlx.diagnostics.manifest import MANIFEST_NAME, MANIFEST_VERSION, DiagnosticsWriter, read_manifest

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "DiagnosticsWriter", "read_manifest"]
