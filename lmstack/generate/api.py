"""The public entry points: `generate` (any strategy, a batch of prompts) and `stream` (one prompt's text as
it arrives). They pick the strategy; the strategies share one DecodeSession (lmstack.generate.session)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lmstack.errors import GenerationError
from lmstack.generate.beam import beam_search
from lmstack.generate.config import GenerationConfig, resolve_config
from lmstack.generate.prompts import PromptInput, TokenizerLike, encode_prompts, fit_to_context
from lmstack.generate.results import GenerationOutput
from lmstack.generate.run import GenerationRun
from lmstack.generate.speculative import speculative_generate
from lmstack.model.protocol import CausalLM
from lmstack.model.seq2seq_decoder import BoundDecoder


def generate(model: CausalLM, tokenizer: TokenizerLike | None, prompts: PromptInput, *,
             config: GenerationConfig | None = None, draft_model: CausalLM | None = None,
             **options: Any) -> GenerationOutput:
    """Generate continuations of one or more prompts.

    model: an lmstack Transformer, or any CausalLM (lmstack.model.protocol): an adapted, quantized or
        value-head model decodes through the same code. tokenizer: an lmstack Tokenizer, or None to work in ids.
    prompts: a string, a list of strings, a list of ids, a list of id lists, or an id tensor (T,)/(B, T).
        Text is encoded as transformers' `tok(text)` encodes it, with the tokenizer's special tokens (e.g.
        BOS), unless add_special_tokens=False.
    options: any GenerationConfig field (temperature=0.7, top_p=0.9, num_beams=4, stop=["\\n"], ...),
        applied over `config`. Unknown names and out-of-range values raise ValueError naming the option.
    draft_model: a smaller model with the same vocabulary for speculative decoding (greedy only).

    Returns a GenerationOutput: token_ids (new ids per prompt), texts (with a tokenizer), finish_reasons,
    logprobs / top_logprobs on request, the n-best beams for beam search, and timing stats.
    """
    config = resolve_config(config, options)
    model, prompts = bind_encoder(model, tokenizer, prompts, config, draft_model)
    if config.num_beams > 1:
        return beam_search(model, tokenizer, prompts, config)
    if draft_model is not None:
        return speculative_generate(model, draft_model, tokenizer, prompts, config)
    run = GenerationRun(model, tokenizer, prompts, config)
    for _ in run.events():
        pass
    return run.output()


def stream(model: CausalLM, tokenizer: TokenizerLike, prompt: str | list[int], *,
           config: GenerationConfig | None = None, **options: Any) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece as tokens arrive.

    A piece never splits a character and never shows part of a stop string. Same options as `generate`.
    """
    if tokenizer is None:
        raise GenerationError("streaming yields text: pass a tokenizer")
    config = resolve_config(config, options)
    if config.num_beams > 1:
        raise GenerationError("beam search cannot stream: the best sequence is known only at the end")
    ids = encode_prompts(prompt, tokenizer, config.add_special_tokens)
    if len(ids) != 1:
        raise GenerationError(f"stream takes one prompt, got {len(ids)}; use GenerationRun.events() for a batch")
    model, ids = bind_encoder(model, tokenizer, ids, config, None)
    run = GenerationRun(model, tokenizer, ids, config)
    for event in run.events():
        if event.text:
            yield event.text


def bind_encoder(model: Any, tokenizer: TokenizerLike | None, prompts: PromptInput, config: GenerationConfig,
                 draft_model: CausalLM | None) -> tuple[CausalLM, PromptInput]:
    """An encoder-decoder (T5) generates through the same strategies: its decoder, bound to the encoded prompts
    (the encoder runs once per prompt), is the CausalLM, and each row's decoder prompt is the start token."""
    if not getattr(model, "is_encoder_decoder", False):
        return model, prompts
    if draft_model is not None or config.compile:
        raise GenerationError("speculative decoding and compile are not supported for encoder-decoder models yet")
    encoder_prompts = fit_to_context(encode_prompts(prompts, tokenizer, config.add_special_tokens),
                                     model.config.vocab_size, model.config.max_seq_len, 0, config.truncate_prompt)
    return BoundDecoder(model, encoder_prompts), [[model.config.decoder_start_token_id]] * len(encoder_prompts)
