"""The embedded character-level tokenizer: one token per printable ASCII character plus specials.

Built with `tokenizers` (WordLevel over single characters, `Split(".")` pre-tokenizer, `Fuse` decoder)
and wrapped in `PreTrainedTokenizerFast`. Load a saved copy with `PreTrainedTokenizerFast.from_pretrained`
(never `AutoTokenizer`: transformers 5 maps model_type=qwen2 to Qwen2Tokenizer and rebuilds it wrongly).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# Conversations render as <|user|>text<|assistant|>text<|end|>; the generation prompt ends at <|assistant|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer (vocab: 4 + 3 specials + 96 characters)."""
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=ROLE_TOKENS,
        padding_side="left",
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    return tok
