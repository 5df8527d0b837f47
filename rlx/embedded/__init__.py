"""The embedded default: a tiny Qwen2-family model and a char-level tokenizer built locally, warm-started on a task."""

from rlx.embedded.model import build_model
from rlx.embedded.tokenizer import build_tokenizer, load_tokenizer
from rlx.embedded.warmstart import ensure_warm_started, warmstart_key

__all__ = ["build_model", "build_tokenizer", "load_tokenizer", "ensure_warm_started", "warmstart_key"]
