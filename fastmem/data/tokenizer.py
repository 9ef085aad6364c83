"""A character-level tokenizer for the built-in problems, built with the `tokenizers` library."""
from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHARACTERS = string.digits + string.ascii_lowercase + " +-*/=<>?:,.()"
# The class name saved in tokenizer_config.json. transformers 5 saves "TokenizersBackend", a name 4.x does
# not know; "PreTrainedTokenizerFast" loads the same tokenizer.json on 4.56+ and 5.x alike.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of `CHARACTERS`; encoding prepends `<bos>`, decoding joins characters."""
    vocab = {token: index for index, token in enumerate([PAD, BOS, EOS, UNK, *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path) -> None:
    """``tokenizer.save_pretrained(path)``, naming `PORTABLE_TOKENIZER_CLASS` so transformers 4.56+ loads it too."""
    tokenizer.save_pretrained(path)
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
