"""`lmstack chat`: an interactive terminal chat with a model (chat template, streaming, history).

The reply budget is fitted to the model's context: a turn's prompt is the whole conversation (oldest
exchanges dropped first) and keeps at least `min_reply` tokens free, and the reply gets what the context
leaves, at most --max-new-tokens. In a terminal, input has line editing and history (readline); Ctrl-C
while a reply streams stops that reply and returns to the prompt; Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmstack.cli.args import text_arg
from lmstack.cli.generate import DEVICE_HELP, add_generation_flags, config_from_args, load_model_and_tokenizer
from lmstack.errors import ConfigError, InputFileError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.run import GenerationRun
from lmstack.schema import decode_utf8

# Markers that end an assistant turn in the common chat templates (ChatML, Llama 3, Phi, SentencePiece).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256}
CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /quit"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """EOS plus the chat template's end-of-turn markers present in the vocabulary."""
    ids = {tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS} | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


def min_reply_tokens(context: int, max_new_tokens: int) -> int:
    """Tokens a reply is always left: a quarter of the context, or all of --max-new-tokens if smaller.
    Older turns are dropped to keep them free, so a long conversation never squeezes the reply to nothing."""
    return min(max_new_tokens, max(context // 4, 1))


def main(argv: list[str]) -> int:
    """Chat with a model in the terminal (chat template, streaming, history; /reset, /system TEXT, /quit)."""
    parser = argparse.ArgumentParser(prog="lmstack chat", description=main.__doc__ + "\n" + CHAT_HELP)
    parser.add_argument("--model", type=Path, required=True, help="model directory (tokenizer with a chat template)")
    parser.add_argument("--adapter", type=Path, help="an adapter directory for --model (peft format: LoRA, DoRA, "
                        "IA3, prompt / P- / prefix tuning; or lmstack bottleneck)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    add_generation_flags(parser, CHAT_DEFAULTS)
    args = parser.parse_args(argv)
    config = config_from_args(args, CHAT_DEFAULTS)
    if config.num_beams > 1:
        raise ConfigError("--num-beams: chat streams its replies, and beam search cannot stream; use "
                          "`lmstack generate --chat --num-beams N`")
    system = text_arg(args.system, "--system") if args.system is not None else None
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.adapter)
    if tokenizer.chat_template is None:
        raise ConfigError(f"{args.model}: the tokenizer has no chat_template; `lmstack chat` needs one")
    if config.eos_token_ids is None:
        config = config.replace(eos_token_ids=end_of_turn_ids(tokenizer))
    context = model.config.max_seq_len
    min_reply = min_reply_tokens(context, config.max_new_tokens)
    if min_reply < config.max_new_tokens:  # say up front that replies can come out shorter than asked
        print(f"lmstack chat: the model's context is {context} tokens; a reply gets what the conversation leaves "
              f"of it (at most {config.max_new_tokens} tokens, at least {min_reply}: older turns are dropped to "
              "keep that free)", file=sys.stderr, flush=True)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP)
    history: list[dict[str, str]] = []
    for text in _input_lines(interactive):
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            history = []
            print("[conversation cleared]", flush=True)
            continue
        if command.startswith("/system"):
            system = command[len("/system"):].strip() or None
            print(f"[system message {'set' if system else 'cleared'}]", flush=True)
            continue
        if command.startswith("/"):
            print(f"[unknown command {command.split()[0]}; {CHAT_HELP}]", flush=True)
            continue
        history.append({"role": "user", "content": text})
        ids = _fit_conversation(tokenizer, system, history, context - min_reply)
        if ids is None:
            history.pop()
            alone = len(_render(tokenizer, system, [{"role": "user", "content": text}]))
            print(f"[message too long: with the chat template it takes {alone} of the model's {context} context "
                  f"tokens, and a reply needs {min_reply}; shorten it (or lower --max-new-tokens)]", flush=True)
            continue
        budget = min(config.max_new_tokens, context - len(ids))
        reply, finish = _stream_reply(model, tokenizer, ids, config.replace(max_new_tokens=budget))
        if finish is None:
            print("\n[reply stopped]", flush=True)
        else:
            print(flush=True)
            if finish == "length" and budget < config.max_new_tokens:
                print(f"[reply cut at {budget} tokens: the conversation fills the rest of the model's {context}-"
                      "token context; /reset starts afresh]", flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0


def _stream_reply(model: Any, tokenizer: Any, ids: list[int], config: GenerationConfig) -> tuple[str, str | None]:
    """Print the reply as it is generated; (its text, finish reason), or (the text so far, None) after Ctrl-C."""
    run = GenerationRun(model, tokenizer, [ids], config)
    events = run.events()
    pieces = []
    try:
        for event in events:
            if event.text:
                pieces.append(event.text)
                print(event.text, end="", flush=True)
    except KeyboardInterrupt:  # stop this reply only; the conversation goes on
        events.close()
        return "".join(pieces), None
    return "".join(pieces), run.output().finish_reasons[0]


def _input_lines(interactive: bool) -> Iterator[str]:
    """The user's lines. In a terminal: input() with readline's line editing and history; Ctrl-C or Ctrl-D
    at the prompt ends the chat, and a line that is not UTF-8 is skipped with a note. From a pipe: stdin's
    lines, where one that is not UTF-8 is an error naming its line."""
    if interactive:
        try:
            import readline  # noqa: F401  (imported for its effect: input() gets editing and history)
        except ImportError:  # a Python built without it: plain input()
            pass
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            except UnicodeDecodeError:
                print("[that line is not UTF-8 text; ignored]", flush=True)
                continue
            if any("\udc80" <= ch <= "\udcff" for ch in line):  # undecodable bytes under surrogateescape
                print("[that line is not UTF-8 text; ignored]", flush=True)
                continue
            yield line
        return
    source = getattr(sys.stdin, "buffer", None)
    for number, line in enumerate(source if source is not None else sys.stdin, 1):
        if isinstance(line, bytes):
            line = decode_utf8(line, "<stdin>", InputFileError, "send UTF-8 text", first_line=number)
        yield line.rstrip("\r\n")


def _render(tokenizer: Any, system: str | None, history: list[dict[str, str]]) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + history
    # Without special tokens, as transformers' apply_chat_template(tokenize=True): the template writes them.
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def _fit_conversation(tokenizer: Any, system: str | None, history: list[dict[str, str]], budget: int
                      ) -> list[int] | None:
    """Render the conversation; drop the oldest exchanges until it fits `budget` tokens (None if even the
    latest message alone does not fit)."""
    while history:
        ids = _render(tokenizer, system, history)
        if len(ids) <= budget:
            return ids
        if len(history) == 1:
            return None
        del history[:2]  # the oldest user message and its reply
    return None
