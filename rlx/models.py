"""Loading the policy (embedded or real) and its tokenizer through the real `from_pretrained` path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlx.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_dir(cfg) -> str:
    """The directory or hub id of the policy; for `embedded`, the cached warm-started model (built on rank 0)."""
    if cfg.model.name_or_path != "embedded":
        return cfg.model.name_or_path
    from accelerate import PartialState

    from rlx.embedded import ensure_warm_started

    state = PartialState()
    path = None
    with state.main_process_first():  # rank 0 builds the cache, the others then find it
        path = ensure_warm_started(cfg, progress=state.is_main_process)
    return str(path)


def is_embedded_dir(path: str) -> bool:
    return (Path(path) / "warmstart.json").exists()


def load_tokenizer_for(path: str):
    if is_embedded_dir(path):
        from rlx.embedded import load_tokenizer

        return load_tokenizer(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a tokenizer from '{path}': {e}. Give an HF-format model directory or hub id."
        ) from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, cfg=None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` with the config's dtype / attention / trust settings."""
    mcfg = cfg.model if cfg is not None else None
    if mcfg is not None:
        if mcfg.dtype not in _DTYPES:
            raise UserError(f"model.dtype must be one of {', '.join(_DTYPES)}, got '{mcfg.dtype}'.")
        kwargs.setdefault("dtype", _DTYPES[mcfg.dtype])
        if mcfg.attn_implementation:
            kwargs.setdefault("attn_implementation", mcfg.attn_implementation)
        kwargs.setdefault("trust_remote_code", mcfg.trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        # VLMs (e.g. Qwen2.5-VL, Activation Replay's MM-Eureka pair) map only to ImageTextToText.
        vlm = _image_text_to_text(path, kwargs) if isinstance(e, ValueError) else None
        if vlm is not None:
            return vlm
        raise UserError(
            f"cannot load a causal LM from '{path}': {e}. Give an HF-format model directory (config.json + "
            "weights) or a hub id reachable from here."
        ) from None


def _image_text_to_text(path: str, kwargs: dict):
    """The model as `AutoModelForImageTextToText`, or None when it is not one either."""
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        return None
