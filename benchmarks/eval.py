"""Multiple-choice scoring throughput: lmstack eval vs lm-evaluation-harness's `hf` backend, same run.

Model: a Llama-style 4.5M-parameter model (vocab 4096, width 256, 4 layers, 4/2 heads, SwiGLU 688, context 512:
the quickstart's size) with a byte-level BPE trained on HellaSwag text, saved once with lmstack.save_model;
lm-eval loads that directory through transformers. Task: the first --items HellaSwag validation items
(0- and 5-shot, lm-eval's hellaswag preprocessing, examples from other items of the same activity), the same context and " " + ending continuations for both.
Both sides are timed from text to log-likelihoods (tokenization included): lmstack's
`evaluate_multiple_choice`, lm-eval's `HFLM.loglikelihood` on the identical (context, continuation) requests.
Batch size: --batch-size for both (lm-eval counts (context, ending) requests per forward; lmstack counts rows,
each an item's context with its 4 endings as a tree, several short items sharing a row); --peer-batch-size sets
lm-eval's separately. Best of --repeats runs, lmstack and lm-eval alternating; the max log-likelihood difference
and the agreement of acc / acc_norm are checked too.

Prints one JSON line per --shots value (default 0 and 5: few-shot prompts make the shared context longer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmstack
from lmstack.eval.multiple_choice import argmax, evaluate_multiple_choice
from lmstack.eval.tasks import read_hellaswag
from lmstack.tokenizer import Tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"
CONFIG = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688, max_seq_len=512,
              tie_word_embeddings=True, init_std=0.1)


def cpu() -> dict:
    """The CPU model and the vector flags that decide which kernels run (detected, never assumed)."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")).split())
        info["flags"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"})
    except (OSError, StopIteration):
        pass
    return info


def build_model(directory: Path, task) -> None:
    texts = [d.query + " " + " ".join(d.choices) for d in task.docs[2000:6000]]  # not the scored items
    tokenizer = train_tokenizer(iter(texts), "bpe", 4096)
    torch.manual_seed(0)
    config = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                 bos_token_id=tokenizer.bos_token_id, **CONFIG)
    lmstack.save_model(lmstack.Transformer(config), directory, extra_files=tokenizer.files())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--peer-batch-size", type=int, help="lm-eval's batch size (default: --batch-size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5], help="one JSON line per few-shot count")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    task = read_hellaswag(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        build_model(directory, task)
        model, tokenizer = lmstack.load_model(directory).eval(), Tokenizer.load(directory)

        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        peer_batch = args.peer_batch_size or args.batch_size
        peer = HFLM(pretrained=str(directory), batch_size=peer_batch, device="cpu")
        for shots in args.shots:
            print(json.dumps(measure(model, tokenizer, peer, Instance, task, shots, args, peer_batch)), flush=True)


def measure(model, tokenizer, peer, Instance, task, shots: int, args, peer_batch: int) -> dict:
    def ours():
        return evaluate_multiple_choice(model, tokenizer, task, shots=shots, limit=args.items,
                                        batch_size=args.batch_size)

    result = ours()  # warm-up; also gives the requests the peer scores
    requests = [(s["context"], " " + c) for s in result.samples for c in s["choices"]]
    instances = [Instance("loglikelihood", {}, req, i) for i, req in enumerate(requests)]

    def theirs():
        return peer.loglikelihood(instances, disable_tqdm=True)

    peer_out = theirs()  # warm-up
    best_ours, best_theirs = float("inf"), float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = ours()
        best_ours = min(best_ours, time.perf_counter() - start)
        start = time.perf_counter()
        peer_out = theirs()
        best_theirs = min(best_theirs, time.perf_counter() - start)

    peer_lls = [ll for ll, _ in peer_out]
    ours_lls = [ll for s in result.samples for ll in s["loglikelihoods"]]
    agree_acc = agree_norm = at = 0
    for s in result.samples:
        theirs_item = peer_lls[at:at + len(s["choices"])]
        at += len(s["choices"])
        agree_acc += argmax(theirs_item) == s["pred"]
        agree_norm += argmax([ll / len(c) for ll, c in zip(theirs_item, s["choices"])]) == s["pred_norm"]
    n = len(result.samples)
    return {"benchmark": "eval_multiple_choice", "task": f"hellaswag ({shots}-shot, validation)", "items": n,
            "choices": len(requests), "batch_size": args.batch_size, "peer_batch_size": peer_batch,
            "lmstack_items_per_s": round(n / best_ours, 2), "peer": "lm-eval hf backend",
            "peer_items_per_s": round(n / best_theirs, 2), "ratio": round(best_theirs / best_ours, 2),
            "max_abs_loglikelihood_diff": max(abs(a - b) for a, b in zip(ours_lls, peer_lls)),
            "same_predictions": {"acc": agree_acc / n, "acc_norm": agree_norm / n},
            "lmstack_tokens_run": result.info["tokens_run"], "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "cpu": cpu(), "python": sys.version.split()[0],
            "torch": torch.__version__}


if __name__ == "__main__":
    main()
