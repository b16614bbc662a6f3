"""The README's code blocks, run as written, in order, in a fresh copy of the checkout.

A new user copies these blocks first, so a block that no longer runs is a bug. Each ```bash / ```python
block is one test, run in file order in one shared directory (later blocks use what earlier ones wrote,
as a reader following the README would). `lmstack ...` commands run in this process (through the CLI's
`main`, exactly as the shell would call it), anything else in bash.

- The download (`curl ... input.txt`) is served from the test data (LMSTACK_TEST_DATA): no network here;
  `../shared/data` (where this repository's development data sits beside the checkout) is that data too.
- Expensive commands (SLOW) run only with --runslow; cheap ones always. Long runs get small settings
  (SMALL: options appended, later options win) so the default suite stays fast.
- Blocks that install packages or run this test suite (SKIP) are not run.
- Blocks marked ```bash sketch / ```python sketch (outlines with placeholders such as DIR) are not run.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmstack.cli import main as lmstack_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SKIP = ("pip install", "python -m pytest", "python3 -m venv")
SLOW = ("builtin:python-docs", "lmstack quickstart", "torchrun", "runs/quickstart", "runs/gutenberg", "data/pydocs-wp")
SMALL = {  # command prefix -> options appended in the default (fast) run
    "lmstack pretrain": ["--train.steps=4", "--train.eval_every=2", "--train.eval_windows=4",
                         "--train.progress=false", "--train.peak_flops=1e12"],
    "lmstack quickstart": ["--steps", "4", "--seq-len", "64", "--batch-size", "2"],
}
DOWNLOADS = {"input.txt": "tinyshakespeare/input.txt"}  # a file curl fetches -> where the test data holds it


@dataclass
class Block:
    line: int  # where the block starts in README.md
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def readme_blocks() -> list[Block]:
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if lang is None and line.startswith("```"):
            lang, start, lines = line[3:].strip(), number + 1, []
        elif lang is not None and line.startswith("```"):
            if lang in ("bash", "python"):
                blocks.append(Block(start, lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def shell_commands(text: str) -> list[str]:
    """A bash block -> its commands (continuation lines joined, comments and blank lines dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, shared_data) -> Path:
    """A fresh copy of the repository's tracked files (what a clone holds), with nothing built or run in it."""
    for name, source in DOWNLOADS.items():
        if not (shared_data / source).exists():
            pytest.skip(f"{shared_data / source} (served as the README's download of {name}) not present")
    target = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = listed.stdout.splitlines() if listed.returncode == 0 else ["README.md", *map(str, Path("configs").glob("*"))]
    for name in files:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def test_the_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 8 and {b.lang for b in BLOCKS} == {"bash", "python"}
    # a placeholder model directory in a block that runs would fail it only when that command runs: catch it here
    for block in BLOCKS:
        assert not re.search(r"--model (DIR|BASE)\b", block.text), f"{block.id}: placeholders; mark it `sketch`"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, checkout: Path, request, monkeypatch, shared_data):
    monkeypatch.chdir(checkout)
    slow_ok = bool(request.config.getoption("--runslow"))
    if block.lang == "python":
        if any(marker in block.text for marker in SLOW) and not slow_ok:
            pytest.skip("expensive: runs with --runslow")
        exec(compile(block.text, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
        return
    commands = shell_commands(block.text)
    if any(marker in command for command in commands for marker in SKIP):
        pytest.skip("installs packages or runs the test suite itself")
    outputs = {}
    for command in commands:
        if any(marker in command for marker in SLOW) and not slow_ok:
            continue
        outputs[command] = run_command(command, checkout, shared_data, small=not slow_ok)
    if any("tokenizer decode" in c for c in outputs):
        check_decode_example(outputs)


def run_command(command: str, cwd: Path, shared_data: Path, small: bool) -> str:
    """Run one README command; returns its standard output. A failure fails the test with the command."""
    command = command.replace("$PWD/../shared/data", str(shared_data)).replace("../shared/data", str(shared_data))
    words = shlex.split(command, comments=True)
    if words[0] == "curl":
        name = words[-1].rsplit("/", 1)[-1]
        shutil.copyfile(shared_data / DOWNLOADS[name], cwd / name)
        return ""
    if words[0] != "lmstack":
        done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done.stdout
    target = None
    if ">" in words:  # the one redirection the README uses: stdout into a file
        target = cwd / words[words.index(">") + 1]
        words = words[:words.index(">")]
    if small:
        words += next((extra for prefix, extra in SMALL.items() if command.startswith(prefix)), [])
    stdout = io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(b""))  # an interactive verb (chat) reads EOF and leaves
    with contextlib.redirect_stdout(stdout), _stdin(stdin):
        try:
            code = lmstack_main(words[1:])
        except SystemExit as e:
            code = e.code
    assert code == 0, f"{command}: exit {code}\n{stdout.getvalue()}"
    if target is not None:
        target.write_text(stdout.getvalue(), encoding="utf-8")
    return stdout.getvalue()


@contextlib.contextmanager
def _stdin(stream):
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


def check_decode_example(outputs: dict[str, str]) -> None:
    """The README decodes the ids it encoded: the ids it shows must be the ones `encode` prints."""
    encode = next(c for c in outputs if "tokenizer encode" in c)
    decode = next(c for c in outputs if "tokenizer decode" in c)
    encoded_text = shlex.split(encode, comments=True)[-1]
    printed_ids = next(line for line in outputs[encode].splitlines() if line.startswith("ids:")).split()[1:]
    shown_ids = [w for w in shlex.split(decode, comments=True) if w.isdigit()]
    assert shown_ids == printed_ids, f"README decodes {shown_ids}, but `{encode}` prints {printed_ids}"
    assert outputs[decode].rstrip("\n") == encoded_text
