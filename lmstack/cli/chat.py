"""`lmstack chat`: an interactive terminal chat with a model (chat template, streaming, history)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmstack.cli.generate import add_generation_flags, config_from_args, load_model_and_tokenizer
from lmstack.errors import ConfigError
from lmstack.generate.api import stream

# Markers that end an assistant turn in the common chat templates (ChatML, Llama 3, Phi, SentencePiece).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256}


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """EOS plus the chat template's end-of-turn markers present in the vocabulary."""
    ids = {tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS} | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /quit"


def main(argv: list[str]) -> int:
    """Chat with a model in the terminal (chat template, streaming, history; /reset, /system TEXT, /quit)."""
    parser = argparse.ArgumentParser(prog="lmstack chat", description=main.__doc__ + "\n" + CHAT_HELP)
    parser.add_argument("--model", type=Path, required=True, help="model directory (tokenizer with a chat template)")
    parser.add_argument("--adapter", type=Path, help="an adapter directory for --model (peft format: LoRA, DoRA, "
                        "IA3, prompt / P- / prefix tuning; or lmstack bottleneck)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    add_generation_flags(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args, CHAT_DEFAULTS)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.adapter)
    if tokenizer.chat_template is None:
        raise ConfigError(f"{args.model}: the tokenizer has no chat_template; `lmstack chat` needs one")
    if config.eos_token_ids is None:
        config = config.replace(eos_token_ids=end_of_turn_ids(tokenizer))
    interactive = sys.stdin.isatty()
    system, history = args.system, []
    if interactive:
        print(CHAT_HELP)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            return 0
        if text.strip() == "/reset":
            history = []
            print("[conversation cleared]", flush=True)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"[system message {'set' if system else 'cleared'}]", flush=True)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}; {CHAT_HELP}]", flush=True)
            continue
        history.append({"role": "user", "content": text})
        ids = _fit_conversation(tokenizer, system, history, model.config.max_seq_len - config.max_new_tokens)
        if ids is None:
            history.pop()
            print("[message too long for the model's context; shorten it or lower --max-new-tokens]", flush=True)
            continue
        reply = []
        for piece in stream(model, tokenizer, ids, config=config):
            reply.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})


def _fit_conversation(tokenizer: Any, system: str | None, history: list[dict[str, str]], budget: int
                      ) -> list[int] | None:
    """Render the conversation; drop the oldest exchanges until it fits `budget` tokens (None if even the
    latest message alone does not fit)."""
    while history:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        # Without special tokens, as transformers' apply_chat_template(tokenize=True): the template writes them.
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                               add_special_tokens=False)
        if len(ids) <= budget:
            return ids
        if len(history) == 1:
            return None
        del history[:2]  # the oldest user message and its reply
    return None
