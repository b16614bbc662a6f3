"""What a new user meets in `lmstack generate` and `lmstack chat` (issue 18): the reply budget fitted to the
context, --help's defaults, Ctrl-C and line editing in a real terminal (a pty), the output of several
results, and user mistakes as one line."""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from lmstack.cli import main
from lmstack.generate import generate

ROOT = Path(__file__).resolve().parents[2]


def _model_dir(directory: Path, **model) -> Path:
    """A random llama with the BPE/ChatML tokenizer of the tiny fixture, saved as `lmstack quickstart` saves."""
    import pydoc_data.topics

    import lmstack
    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:40]), "bpe", 400)
    torch.manual_seed(0)
    config = lmstack.preset("llama-tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                            **model)
    lmstack.save_model(lmstack.Transformer(config), directory, extra_files=tokenizer.files())
    return directory


@pytest.fixture(scope="module")
def quickstart_shaped_dir(tmp_path_factory):
    """A model with the context `lmstack quickstart` gives its model (256 tokens), untrained and narrower, so
    that replies are fast (tests/quickstart's slow end-to-end test chats with a real quickstart's output)."""
    from lmstack.quickstart import QUICKSTART_MODEL

    return _model_dir(tmp_path_factory.mktemp("qs") / "model", max_seq_len=QUICKSTART_MODEL["max_seq_len"])


# ------------------------------------------------------------------------------------------- chat


def test_chat_with_the_quickstart_model_fits_the_reply_to_the_context(quickstart_shaped_dir, monkeypatch, capsys):
    """chat's default 256 new tokens do not fit beside any message in a 256-token context: the reply gets what
    the context leaves (and chat says so) instead of refusing every message. (That its replies are the
    model's own generations is test_cli.py's chat test.)"""
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(quickstart_shaped_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(quickstart_shaped_dir), "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "context is 256 tokens" in captured.err and "at most 256 tokens, at least 64" in captured.err
    assert "too long" not in captured.out
    prompt = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                add_generation_prompt=True)))
    # the untrained model's greedy reply never ends its turn: it runs to the end of the context, and says so
    assert captured.out.endswith(f"\n[reply cut at {256 - prompt} tokens: the conversation fills the rest of the "
                                 "model's 256-token context; /reset starts afresh]\n")


def test_chat_message_too_long_says_what_is_true(quickstart_shaped_dir, monkeypatch, capsys):
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(quickstart_shaped_dir)
    message = " ".join(["dictionary"] * 150)
    length = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                                add_generation_prompt=True)))
    assert length > 256 - 64
    monkeypatch.setattr("sys.stdin", io.StringIO(message + "\n"))
    assert main(["chat", "--model", str(quickstart_shaped_dir), "--max-new-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert f"[message too long: with the chat template it takes {length} of the model's 256 context tokens, " \
           "and a reply needs 64" in out


def test_chat_help_shows_the_defaults_it_uses(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, value in (("--max-new-tokens INT", 256), ("--temperature FLOAT", 0.7), ("--top-p FLOAT", 0.9)):
        assert f"{flag} default {value}" in help_text


def test_chat_stdin_that_is_not_utf8_is_one_line(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi\ncaf\xe9\n")))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "<stdin>:2: not valid UTF-8 (byte 0xe9 at column 4)" in err


# ------------------------------------------------------------------------------------------- a real terminal


class Terminal:
    """`lmstack chat` on a pseudo-terminal: keys in, screen text out (pty.fork makes it the controlling
    terminal, so Ctrl-C is a SIGINT from the line discipline, as a user's would be)."""

    def __init__(self, argv: list[str]):
        import pty

        env = {**os.environ, "TERM": "xterm", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.execvpe(sys.executable, [sys.executable, "-m", "lmstack", *argv], env)
        self.screen = ""

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def read_until(self, pattern: str, timeout: float = 120.0, start: int = 0) -> re.Match:
        deadline = time.time() + timeout
        while (found := re.compile(pattern).search(self.screen, start)) is None:
            assert time.time() < deadline, f"waited for {pattern!r}; the screen:\n{self.screen}"
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.screen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    assert False, f"chat left while waiting for {pattern!r}; the screen:\n{self.screen}"
        return found

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.screen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError(f"chat did not leave; the screen:\n{self.screen}")


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory):
    """A tiny model with a longer context, so that a reply streams long enough (seconds) to be interrupted."""
    return _model_dir(tmp_path_factory.mktemp("long") / "model", max_seq_len=1024)


# slow: its keys race the chat's output on a loaded machine (seen failing there at two different steps while
# passing in other runs of the same commit), so it runs with --runslow until the waits are made robust
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pty")
def test_chat_in_a_terminal_ctrl_c_stops_the_reply_and_readline_edits(long_context_dir):
    # sampled: the untrained model's greedy reply is newlines only, invisible on the screen
    term = Terminal(["chat", "--model", str(long_context_dir), "--ignore-eos", "--max-new-tokens", "768",
                     "--temperature", "1", "--seed", "0", "--device", "cpu"])
    try:
        term.read_until(r"commands: /reset")
        term.read_until(r"> ")
        # line editing: left arrow moves the cursor back ("/fo" -> "/fXo"); up arrow recalls the last line
        term.send("/fo\x1b[DX\r")
        first = term.read_until(r"\[unknown command /fXo;")
        term.read_until(r"> ", start=first.end())
        term.send("\x1b[A\r")
        first = term.read_until(r"\[unknown command /fXo;", start=first.end())
        # Ctrl-C while the reply streams stops the reply, not the chat
        term.send("hello\r")
        echoed = term.read_until(r"hello\r?\n", start=first.end())
        term.read_until(r"\S", start=echoed.end())  # the reply has started
        term.send("\x03")
        stopped = term.read_until(r"\[reply stopped\]", timeout=60)
        term.read_until(r"> ", start=stopped.end())
        term.send("/reset\r")
        cleared = term.read_until(r"\[conversation cleared\]", start=stopped.end())
        term.read_until(r"> ", start=cleared.end())
        # a second Ctrl-C, at the prompt, leaves
        term.send("\x03")
        assert term.wait() == 0
        assert "Traceback" not in term.screen and "interrupted" not in term.screen
    finally:
        try:
            os.kill(term.pid, 9)
            os.waitpid(term.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(term.fd)


@pytest.mark.slow  # a second chat process: ~10 s of starting torch on a busy machine
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pty")
def test_chat_in_a_terminal_ctrl_d_leaves(tiny_model_dir):
    term = Terminal(["chat", "--model", str(tiny_model_dir), "--device", "cpu"])
    try:
        term.read_until(r"> ")
        term.send("\x04")
        assert term.wait() == 0
    finally:
        os.close(term.fd)


# ------------------------------------------------------------------------------------------- generate


def test_generate_stats_for_a_single_streamed_prompt(tiny_model_dir, tiny, capsys):
    model, tokenizer = tiny
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "def main", "--max-new-tokens", "6",
                 "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == generate(model, tokenizer, "def main", max_new_tokens=6).texts[0] + "\n"
    prompt_tokens = len(tokenizer.encode("def main", add_special_tokens=True))
    assert re.fullmatch(rf"prefill {prompt_tokens} tokens in [\d.]+ ms; decode 6 tokens in [\d.]+ ms "
                        r"\([\d.]+ tok/s\)\n", captured.err)


def test_generate_several_results_are_told_apart(tiny_model_dir, tiny, capsys):
    model, tokenizer = tiny
    prompts = ["def main", "x = 1\ny"]
    argv = ["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "5"]
    assert main(argv + [w for p in prompts for w in ("--prompt", p)]) == 0
    texts = generate(model, tokenizer, prompts, max_new_tokens=5).texts
    assert capsys.readouterr().out == f'=== 1: "def main" ===\n{texts[0]}\n=== 2: "x = 1\\ny" ===\n{texts[1]}\n'
    # --num-return-sequences 2 prints both sequences, best first
    assert main(argv + ["--prompt", "x = 1", "--num-beams", "3", "--num-return-sequences", "2"]) == 0
    beams = generate(model, tokenizer, "x = 1", max_new_tokens=5, num_beams=3, num_return_sequences=2).beams[0]
    out = capsys.readouterr().out
    headers = re.findall(r'^=== 1: "x = 1" \(beam (\d) of 2, score (-?[\d.]+)\) ===$', out, re.MULTILINE)
    assert [(int(i), float(s)) for i, s in headers] == [(k + 1, round(b.score, 3)) for k, b in enumerate(beams)]
    assert out.endswith(f"{beams[1].text}\n") and f"===\n{beams[0].text}\n===" in out


def test_generate_refuses_what_it_would_ignore_and_mistakes_are_one_line(tiny_model_dir, tmp_path, capsys):
    model = ["generate", "--model", str(tiny_model_dir)]
    cases = [
        (["--prompt", "a", "--system", "Be brief."], "--system is the system message of a chat prompt: add --chat"),
        (["--prompt", "a", "--device", "tpu"], "unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
        (["--prompt", "caf\udce9"], "--prompt:1: not valid UTF-8 (byte 0xe9 at column 4)"),
        (["--prompt", "a", "--out", "/proc/x/out.jsonl"], "/proc/x/out.jsonl: cannot write the output there"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--prompt", "a", "--device", "cuda"], "torch.cuda.is_available() is False"))
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    cases.append((["--prompts-file", str(bad)], f"{bad}:2: not valid UTF-8 (byte 0xe9 at column 16)"))
    for argv, words in cases:
        assert main(model + argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)


def test_generate_out_is_the_output_flag_and_old_spellings_still_work(tiny_model_dir, tmp_path, capsys):
    for flag in ("--out", "--output", "-o"):
        target = tmp_path / f"{flag.strip('-')}.jsonl"
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a", "--max-new-tokens", "2",
                     flag, str(target)]) == 0
        assert json.loads(target.read_text())["prompt"] == "a"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "--out FILE" in help_text and "--output" not in help_text


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_a_truncated_weights_file_is_one_line(verb, tiny_model_dir, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main([verb, "--model", str(broken)] + (["--prompt", "a"] if verb == "generate" else [])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights}: not a readable safetensors file, truncated or corrupt" in err


def test_bad_numbers_and_devices_read_as_every_verb_words_them(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "a", "--top-k", "x"])
    assert "argument --top-k: expected an integer, got 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chat", "--model", str(tiny_model_dir), "--top-p", "x"])
    assert "argument --top-p: expected a number, got 'x'" in capsys.readouterr().err
    for argv, words in ((["eval", "--model", "m", "--task", "perplexity", "--limit", "x"], "--limit: expected an integer"),
                        (["quantize", "--model", "m", "--method", "rtn", "--damp", "x"], "--damp: expected a number"),
                        (["info", "llama-tiny", "--context", "1.5"], "--context: expected an integer, got '1.5'")):
        with pytest.raises(SystemExit):
            main(argv)
        assert words in capsys.readouterr().err
    text = tmp_path / "a.txt"
    text.write_text("some text\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "perplexity", "--data", str(text),
                 "--device", "tpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown device 'tpu'" in err
