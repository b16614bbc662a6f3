"""Tokenizers: train (byte-level BPE, WordPiece, Unigram, char), load any Hugging Face tokenizer directory, save one.

    tokenizer.py      Tokenizer: the Rust `tokenizers` backend + special tokens + chat template; load / save
    special.py        SpecialTokens by role, the kinds
    training.py       train_tokenizer and the `tokenizers` pipeline of each kind
    chat_template.py  Jinja chat templates (ChatML, Llama 3, any HF template) and assistant-token masks
    stream.py         StreamDecoder: ids -> text as they arrive, never half a character
"""

from lmstack.errors import TokenizerError
from lmstack.tokenizer.special import CHATML_MARKERS, KINDS, ROLES, Kind, SpecialTokens
from lmstack.tokenizer.stream import StreamDecoder
from lmstack.tokenizer.tokenizer import Tokenizer, load_tokenizer
from lmstack.tokenizer.training import train_tokenizer

__all__ = ["CHATML_MARKERS", "KINDS", "ROLES", "Kind", "SpecialTokens", "StreamDecoder", "Tokenizer",
           "TokenizerError", "load_tokenizer", "train_tokenizer"]
