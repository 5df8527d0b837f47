"""Loading the policy (embedded or real) and its tokenizer through the real `from_pretrained` path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlx.errors import UserError, hub_hint

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
            f"cannot load a tokenizer from '{path}': {_first_line(e)}. {hub_hint(path, 'model.name_or_path')}"
        ) from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, cfg=None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` with the config's dtype / attention / trust settings.

    Always loads the full weights (on CPU), also under a DeepSpeed ZeRO-3 launch: see `outside_zero3_init`.
    """
    mcfg = cfg.model if cfg is not None else None
    if mcfg is not None:
        if mcfg.dtype not in _DTYPES:
            raise UserError(f"model.dtype must be one of {', '.join(_DTYPES)}, got '{mcfg.dtype}'.")
        kwargs.setdefault("dtype", _DTYPES[mcfg.dtype])
        if mcfg.attn_implementation:
            kwargs.setdefault("attn_implementation", mcfg.attn_implementation)
        kwargs.setdefault("trust_remote_code", mcfg.trust_remote_code)
    try:
        with outside_zero3_init():
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        # VLMs (e.g. Qwen2.5-VL, Activation Replay's MM-Eureka pair) map only to ImageTextToText.
        with outside_zero3_init():
            vlm = _image_text_to_text(path, kwargs) if isinstance(e, ValueError) else None
        if vlm is not None:
            return vlm
        raise UserError(
            f"cannot load a causal LM from '{path}': {_first_line(e)}. {hub_hint(path, 'model.name_or_path')}"
        ) from None


@contextlib.contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Load models with full weights even after a ZeRO-3 trainer config exists (no `deepspeed.zero.Init`).

    Once a TrainingArguments with a ZeRO-3 DeepSpeed config exists, `from_pretrained` partitions the weights
    while loading, a collective over all ranks. On CPU that trips DeepSpeed's batch-size assertion (accelerate
    skips DeepSpeed's own distributed init there, so DeepSpeed sees one rank), and a model loaded on only some
    ranks (a lazily loaded reference) would wait forever for the others. rlx loads every model whole, and
    DeepSpeed partitions the ones it trains when the trainer prepares them.
    """
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _image_text_to_text(path: str, kwargs: dict):
    """The model as `AutoModelForImageTextToText`, or None when it is not one either."""
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        return None
