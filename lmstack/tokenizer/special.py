"""Special tokens by role, and the tokenizer kinds lmstack trains."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from lmstack.errors import TokenizerError
from lmstack.tokenizer.chat_template import TEMPLATE_SPECIAL_TOKENS

Kind = Literal["bpe", "wordpiece", "unigram", "char"]
KINDS: tuple[str, ...] = ("bpe", "wordpiece", "unigram", "char")
ROLES: tuple[str, ...] = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
CHATML_MARKERS: tuple[str, ...] = TEMPLATE_SPECIAL_TOKENS["chatml"]


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens by role, plus extra ones (chat markers, tool tags); None means the role is unused."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    cls: str | None = None
    sep: str | None = None
    mask: str | None = None
    extra: tuple[str, ...] = ()

    def roles(self) -> dict[str, str]:
        """{"bos": "<|bos|>", ...} for the roles that are set."""
        return {r: getattr(self, r) for r in ROLES if getattr(self, r) is not None}

    def all(self) -> list[str]:
        """Every special token once, roles first: this order fixes their ids (0, 1, ...) in a trained vocabulary."""
        out: list[str] = []
        for token in [*self.roles().values(), *self.extra]:
            if token not in out:
                out.append(token)
        return out

    def with_extra(self, tokens: Iterable[str]) -> SpecialTokens:
        return replace(self, extra=tuple(dict.fromkeys([*self.extra, *tokens])))

    @classmethod
    def default(cls, kind: str) -> SpecialTokens:
        """The defaults per kind (README, section tokenizer).

        bpe:       <|bos|> <|eos|> <|pad|> + ChatML markers (byte-level: no unk token is ever needed)
        unigram:   <s> </s> <pad> <unk> + ChatML markers (SentencePiece conventions)
        wordpiece: [CLS] [SEP] [PAD] [UNK] [MASK] (BERT); bos=[CLS], eos=[SEP] so documents can be packed
        char:      <|bos|> <|eos|> <|pad|> <unk> (no chat markers: a character model of one corpus)
        """
        if kind == "bpe":
            return cls(bos="<|bos|>", eos="<|eos|>", pad="<|pad|>", extra=CHATML_MARKERS)
        if kind == "unigram":
            return cls(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", extra=CHATML_MARKERS)
        if kind == "wordpiece":
            return cls(bos="[CLS]", eos="[SEP]", pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]")
        if kind == "char":
            return cls(bos="<|bos|>", eos="<|eos|>", pad="<|pad|>", unk="<unk>")
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
