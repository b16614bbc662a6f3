"""Alignment, measured (issue 14): one JSON line per method, with "method".

    dpo        DPO on synthetic preferences with a known rule (lmstack.align.tasks, sorted letters): held-out
               implicit-reward accuracy before / after ("heldout_reward_accuracy"), and how often the policy's
               samples follow the rule before / after
    dpo_lora   the same with a LoRA policy (rank 8, every linear): only the adapter trains, and the reference is
               the policy with its adapter switched off (no second copy of the model); the answer tokens' rows of
               the tied head train beside it and dpo.sft_weight anchors the chosen answers (README: why)
    grpo       GRPO on two-digit addition from an SFT model: greedy exact-match accuracy on held-out problems
               before / after ("accuracy_before", "accuracy_after"; at every checkpoint: "greedy_accuracy_by_step"),
               sampled pass@1, the share of groups with zero advantage and of training wall time spent generating
               ("generation_time_fraction")
    rm         a reward model on the hh-rlhf pairs in ../shared/data: a small LM pretrained on the training
               split's dialogues, then Bradley-Terry; accuracy on a held-out split beside the "longer answer
               wins" baseline
    dpo_speed  one DPO optimizer step (policy + reference forward, backward, AdamW) against trl's DPOTrainer on
               the same tiny Hugging Face Llama and batch, each side in its own process: steps/s, "ratio" and
               peak memory beside it

    python benchmarks/align.py                     # all five (grpo alone: about 12 minutes on a loaded 2-core box)
    python benchmarks/align.py --method grpo --grpo-sft-steps 600 --grpo-lr 1e-4    # from the stronger SFT model
    python benchmarks/align.py --method dpo_lora --dpo-lora-adapter-only --dpo-lora-sft-weight 0   # the old LoRA run

The SFT models are trained here from scratch on the tasks' demonstrations (lmstack.align.task_models), so the
figures need nothing but this repository (and ../shared/data for rm, trl for dpo_speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine() -> dict:
    """Threads, CPU model and the vector extensions that matter for these kernels (detected, not assumed)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {"threads": torch.get_num_threads(), "cpu": model, "cpu_flags": [f for f in wanted if f in flags]}


def _align(cfg_dict: dict):
    from lmstack.schema import load_config
    from lmstack.train.recipes.align import AlignConfig, run
    return run(load_config(AlignConfig, None, [], base=cfg_dict))


# ------------------------------------------------------------------------------------------- dpo (rule)
def bench_dpo_lora(args, work: Path) -> dict:
    """The same DPO run with a LoRA policy: only a rank-8 adapter trains; the reference is the adapter switched off.
    The rows of the (tied) embedding / head of the answer tokens (a-h, EOS) train beside it
    (`lora.trainable_token_indices`): without them the adapter can move the answers' log-probabilities only
    through the trunk, and DPO then lowers the chosen answers with the rejected ones (README, LoRA policies)."""
    from lmstack.align.task_models import task_tokenizer
    from lmstack.align.tasks import LETTERS
    tokenizer = task_tokenizer()
    rows = [] if args.dpo_lora_adapter_only else sorted(
        {i for c in LETTERS for i in tokenizer.encode(c)} | {tokenizer.eos_token_id})
    return bench_dpo(args, work, lora={"r": 8, "lora_alpha": 16.0, "trainable_token_indices": rows},
                     lr=args.dpo_lora_lr, sft_weight=args.dpo_lora_sft_weight)


def bench_dpo(args, work: Path, lora: dict | None = None, lr: float | None = None,
              sft_weight: float | None = None) -> dict:
    from lmstack.align.task_models import sample_answers, train_task_model
    from lmstack.align.tasks import is_sorted_answer, sorted_letters_pairs, sorted_letters_prompts
    from lmstack.data.preference import Renderer, collate_pairs, fixed_batches
    from lmstack.interop.hf import load_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.objectives.dpo import PreferenceConfig, PreferenceObjective
    from lmstack.train.recipes.align import heldout_metrics
    from lmstack.train.reference import FrozenReference

    sft_weight = args.dpo_sft_weight if sft_weight is None else sft_weight
    started = time.perf_counter()
    sft = train_task_model("sorted_letters", work / "sorted-sft", steps=args.sft_steps, seed=args.seed)
    tokenizer, sft_model = Tokenizer.load(sft), load_model(sft).eval()
    prompts = [r["prompt"] for r in sorted_letters_prompts(args.samples, seed=args.seed + 100)]

    def rule_rate(model) -> float:
        answers = sample_answers(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=args.seed)
        return sum(map(is_sorted_answer, answers)) / len(answers)

    held = work / "heldout-pairs.jsonl"  # pairs from another seed: prompts and answers the run never saw
    held.write_text("".join(json.dumps(r) + "\n" for r in sorted_letters_pairs(400, seed=args.seed + 200)))
    from lmstack.data.preference import read_pairs
    encoded, _ = Renderer(tokenizer, sft_model.config.max_seq_len).encode_pairs(read_pairs(held))
    batches = fixed_batches(encoded, lambda items: collate_pairs(items, tokenizer.pad_token_id), 50)
    objective = PreferenceObjective(PreferenceConfig(beta=args.beta), FrozenReference(sft_model))
    before = heldout_metrics(objective, sft_model, batches)
    rule_before = rule_rate(sft_model)
    result, summary = _align({
        "method": "dpo", "model": str(sft), "out_dir": str(work / "dpo"),
        "data": {"task": "sorted_letters", "task_size": 2000, "val_fraction": 0.05},
        "dpo": {"loss": "sigmoid", "beta": args.beta, "sft_weight": sft_weight},
        "optim": {"lr": lr or args.dpo_lr, "weight_decay": 0.0},
        **({"lora": lora} if lora else {}),
        "train": {"steps": args.dpo_steps, "batch_size": 16, "seed": args.seed, "progress": False,
                  "threads": args.threads, "peak_flops": 1e12}})
    policy = load_model(summary["model"]).eval()
    after = heldout_metrics(objective, policy, batches)
    lora_fields = {} if lora is None else {
        "lora": lora, "trainable_parameters": summary["trainable_parameters"], "lr": lr,
        "reference": "the policy with its adapter switched off (no second copy)"}
    return {"method": "dpo_lora" if lora else "dpo", "task": "sorted letters (chosen: alphabetical order)",
            "heldout_pairs": len(encoded),
            "heldout_reward_accuracy_before": round(before["reward_accuracy_ties_half"], 3),
            "heldout_reward_accuracy": round(after["reward_accuracy"], 3),
            "heldout_reward_margin": round(after["reward_margin"], 3),
            "heldout_logps_chosen_before": round(before["logps_chosen"], 2),
            "heldout_logps_chosen": round(after["logps_chosen"], 2),
            "heldout_logps_rejected": round(after["logps_rejected"], 2),
            "rule_following_before": round(rule_before, 3), "rule_following_after": round(rule_rate(policy), 3),
            "samples": len(prompts), "sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps, "beta": args.beta,
            "sft_weight": sft_weight,
            "train_wall_s": summary["wall_s"], "wall_s": round(time.perf_counter() - started, 1),
            "accuracy_note": "before: policy = reference, every pair ties (counted half)", **lora_fields,
            "parameters": summary["parameters"], **machine()}


# ------------------------------------------------------------------------------------------- grpo (arithmetic)
def bench_grpo(args, work: Path) -> dict:
    from lmstack.align.rewards import arithmetic_exact_match
    from lmstack.align.task_models import sample_answers, train_task_model
    from lmstack.align.tasks import arithmetic_problems
    from lmstack.interop.hf import load_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.metrics import read_metrics

    started = time.perf_counter()
    sft = train_task_model("arithmetic", work / "arith-sft", steps=args.grpo_sft_steps, hidden_size=128,
                           seed=args.seed)
    tokenizer = Tokenizer.load(sft)
    seen = {r["prompt"] for r in arithmetic_problems(2000, args.seed)}  # the GRPO run's prompts
    held = [r for r in arithmetic_problems(8 * args.samples, args.seed + 7) if r["prompt"] not in seen][:args.samples]

    def accuracy(directory, temperature: float = 0.0, repeats: int = 1) -> float:
        """Greedy exact match, or (temperature 1) the mean over `repeats` samples per problem: pass@1."""
        model, hits = load_model(directory).eval(), 0.0
        for seed in range(repeats):
            answers = sample_answers(model, tokenizer, [r["prompt"] for r in held], temperature=temperature,
                                     seed=args.seed + seed)
            hits += sum(arithmetic_exact_match("", a, r) for a, r in zip(answers, held))
        return hits / (len(held) * repeats)

    before, sampled_before = accuracy(sft), accuracy(sft, 1.0, 4)
    result, summary = _align({
        "method": "grpo", "model": str(sft), "out_dir": str(work / "grpo"),
        "data": {"task": "arithmetic", "task_size": 2000},
        "grpo": {"group_size": args.group_size, "beta": 0.0, "loss_aggregation": "token",
                 "reward_fns": ["arithmetic_exact_match"]},
        "rollout": {"prompts_per_rollout": args.prompts, "max_new_tokens": 4, "temperature": 1.0},
        "optim": {"lr": args.grpo_lr},
        "train": {"steps": args.grpo_steps, "batch_size": args.prompts * args.group_size, "seed": args.seed,
                  "progress": False, "threads": args.threads, "peak_flops": 1e12,
                  "checkpoint_every": args.grpo_eval_every, "keep_last": 10**6}})
    rollouts = summary["rollouts"]
    steps = [r for r in read_metrics(work / "grpo" / "metrics.jsonl") if r["kind"] == "train"]
    curve = {}  # greedy accuracy at each checkpoint: how noisy the end point is
    for directory in sorted((work / "grpo" / "checkpoints").glob("step-*")) if args.grpo_eval_every else []:
        curve[int(directory.name.split("-")[1])] = round(accuracy(directory), 3)
    return {"method": "grpo", "task": "two-digit addition, exact match", "heldout_problems": len(held),
            "accuracy_before": round(before, 3), "accuracy_after": round(accuracy(summary["model"]), 3),
            "sampled_accuracy_before": round(sampled_before, 3),
            "sampled_accuracy_after": round(accuracy(summary["model"], 1.0, 4), 3),
            "accuracy_note": "accuracy: greedy; sampled: temperature 1 (the policy GRPO trains), 4 samples each",
            "greedy_accuracy_by_step": curve,
            "zero_signal_groups": round(sum(r["zero_signal_groups"] for r in steps) / len(steps), 3),
            "reward_first_last_20_steps": [round(sum(r["reward"] for r in steps[:20]) / 20, 3),
                                           round(sum(r["reward"] for r in steps[-20:]) / 20, 3)],
            "generation_time_fraction": round(rollouts["generation_time_fraction"], 3),
            "rollout_time_fraction": round(rollouts["rollout_s"] / result.wall_s, 3),
            "group_size": args.group_size, "prompts_per_step": args.prompts, "grpo_steps": args.grpo_steps,
            "lr": args.grpo_lr, "sft_steps": args.grpo_sft_steps, "samples": rollouts["samples"],
            "train_wall_s": round(result.wall_s, 1),
            "wall_s": round(time.perf_counter() - started, 1), "generation": "one decode session per step: each "
            "prompt prefilled once, its cache fanned out to its G rows (rollout.sample_groups), eager", **machine()}


# ------------------------------------------------------------------------------------------- rm (hh-rlhf)
def bench_rm(args, work: Path) -> dict:
    from lmstack.align.task_models import sft_objective
    from lmstack.config import ModelConfig
    from lmstack.data.preference import (EncodedExample, ExampleBatches, collate_completions, plain_completion,
                                         plain_prompt, read_pairs, split_holdout)
    from lmstack.interop.hf import save_model
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import train_tokenizer
    from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from lmstack.train.engine import Engine

    path = SHARED / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
    if not path.exists():
        return {"method": "rm", "skipped": f"{path} not present"}
    started = time.perf_counter()
    pairs = read_pairs(path)
    train_pairs, held_pairs = split_holdout(pairs, 0.1, args.seed)  # the recipe's split: the LM never sees held-out
    texts = [plain_prompt(p.prompt) + plain_completion(p.chosen) for p in train_pairs]
    tokenizer = train_tokenizer(iter(texts), "bpe", 4096, chat_template=None)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                         num_kv_heads=4, intermediate_size=344, max_seq_len=256, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    lm = Transformer(config)
    docs = [(tokenizer.encode(t) + [tokenizer.eos_token_id])[-256:] for t in texts]  # the end: the answers
    docs = [EncodedExample(d[:1], d[1:], index=i) for i, d in enumerate(docs)]
    batches = ExampleBatches(docs, lambda items: collate_completions(items, tokenizer.pad_token_id), 16,
                             seed=args.seed)
    Engine(lm, sft_objective, batches, TrainConfig(steps=args.lm_steps, batch_size=16, seq_len=256, eval_every=0,
                                                   progress=False, peak_flops=1e12),
           OptimConfig(lr=1e-3, weight_decay=0.1), ScheduleConfig(kind="cosine", warmup_steps=20, min_lr=1e-4)).fit()
    lm_dir = save_model(lm.eval(), work / "hh-lm", extra_files=tokenizer.files())
    lm_s = time.perf_counter() - started
    result, summary = _align({
        "method": "rm", "model": str(lm_dir), "out_dir": str(work / "rm"),
        "data": {"path": str(path), "format": "text", "max_len": 256, "val_fraction": 0.1},
        "rm": {"center_coef": 0.01}, "optim": {"lr": args.rm_lr},
        "train": {"steps": args.rm_steps, "batch_size": 16, "seed": args.seed, "progress": False, "peak_flops": 1e12}})
    heldout = summary["heldout"]
    longer = sum(len(plain_completion(p.chosen)) > len(plain_completion(p.rejected)) for p in held_pairs)
    return {"method": "rm", "data": "hh-rlhf harmless-base (2,312 pairs), 10% held out",
            "heldout_accuracy": round(heldout["accuracy"], 3), "heldout_pairs": summary["heldout_examples"],
            "longer_answer_baseline": round(longer / len(held_pairs), 3), "heldout_loss": round(heldout["loss"], 4),
            "skipped_pairs": summary["data"]["skipped"], "truncated": summary["data"]["truncated"],
            "lm_params": sum(p.numel() for p in lm.parameters()), "lm_steps": args.lm_steps, "lm_wall_s": round(lm_s, 1),
            "rm_steps": args.rm_steps, "rm_wall_s": summary["wall_s"],
            "wall_s": round(time.perf_counter() - started, 1), **machine()}


# ------------------------------------------------------------------------------------------- dpo_speed (vs trl)
VOCAB, WIDTH, LAYERS, HEADS, FFN = 8192, 256, 4, 8, 688
PAIRS, PROMPT, ANSWER = 8, 64, 64


def _pairs_batch():
    """The same B pairs for both sides: random prompts of 48-64 tokens, answers of 32-64, ids >= 3."""
    from lmstack.data.preference import EncodedPair
    g = torch.Generator().manual_seed(0)

    def ids(low, high):
        return torch.randint(3, VOCAB, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()
    return [EncodedPair(ids(48, PROMPT), ids(32, ANSWER), ids(32, ANSWER), i) for i in range(PAIRS)]


def _hf_model(directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, intermediate_size=FFN, tie_word_embeddings=True,
                         max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model


def lmstack_dpo_step(directory: Path):
    """The engine's step on a fixed batch: the DPO objective (policy + frozen-copy reference) and AdamW."""
    from lmstack.data.preference import collate_pairs
    from lmstack.interop.hf import load_model
    from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from lmstack.train.engine import Engine
    from lmstack.train.objectives.dpo import PreferenceConfig, PreferenceObjective
    from lmstack.train.reference import FrozenReference

    policy = load_model(directory)
    batch = collate_pairs(_pairs_batch(), pad_id=0)

    class Fixed:
        tokens_per_step = int(batch["attention_mask"].sum())

        def micro_batches(self, step):
            return [batch]

    objective = PreferenceObjective(PreferenceConfig(beta=0.1), FrozenReference(policy))
    engine = Engine(policy, objective, Fixed(), TrainConfig(steps=1000, batch_size=PAIRS, progress=False,
                                                           peak_flops=1e12, grad_clip=1.0),
                    OptimConfig(lr=1e-6, weight_decay=0.0), ScheduleConfig(kind="constant"))
    counter = iter(range(10**9))
    return lambda: engine.train_step(next(counter))[0]


def trl_dpo_step(directory: Path):
    """trl's DPOTrainer.training_step (forward of policy and reference, loss, backward) + its AdamW step."""
    import datasets
    import trl
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                              unk_token="t0")),
                                  eos_token="t1", pad_token="t0")
    policy, ref = AutoModelForCausalLM.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory)
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, learning_rate=1e-6, report_to=[], bf16=False,
                         use_cpu=True, per_device_train_batch_size=PAIRS, max_grad_norm=1.0, weight_decay=0.0,
                         lr_scheduler_type="constant", logging_steps=10**9)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list([{"prompt": "t5", "chosen": "t6",
                                                                        "rejected": "t7"}] * 8))
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before calling training_step
    pairs = _pairs_batch()
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, p) in enumerate(zip(rows, pairs + pairs)):
        ids[i, :len(row)], attention[i, :len(row)], completion[i, len(p.prompt):len(row)] = torch.tensor(row), 1, 1
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}

    def step():
        loss = trainer.training_step(trainer.model, dict(inputs))
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def speed_worker(side: str, directory: str, threads: int) -> None:
    from train import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(threads)
    if side == "trl":
        import trl  # noqa: F401  (imports belong to start-up, not to memory)
    else:
        import lmstack.train.engine  # noqa: F401
    reset_peak_rss()
    rss_before = current_rss_bytes()
    step = trl_dpo_step(Path(directory)) if side == "trl" else lmstack_dpo_step(Path(directory))
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for command in sys.stdin:
        command = command.strip()
        if command == "reset_peak":
            reply = {"ok": reset_peak_rss()}
        elif command == "step":
            start = time.perf_counter()
            loss = step()
            reply = {"seconds": time.perf_counter() - start, "loss": loss}
        else:
            reply = {"peak_bytes": peak_rss_bytes() - rss_before}
        print(json.dumps(reply), flush=True)
        if command == "done":
            return


def bench_dpo_speed(args, work: Path) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"method": "dpo_speed", "skipped": "trl is not installed (pip install trl)"}
    _hf_model(work / "hf-llama")
    workers = {}
    for side in ("trl", "lmstack"):
        process = subprocess.Popen([sys.executable, __file__, "--speed-worker", side, str(work / "hf-llama"),
                                    str(args.speed_threads)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        workers[side] = (process, json.loads(process.stdout.readline()))

    def ask(side, command):
        process = workers[side][0]
        process.stdin.write(command + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())
    try:
        for _ in range(2):
            for side in workers:
                ask(side, "step")
        for side in workers:
            ask(side, "reset_peak")
        times = {side: [] for side in workers}
        losses = {}
        for _ in range(args.speed_steps):
            for side in workers:  # interleaved: drift in the machine's speed hits both sides alike
                reply = ask(side, "step")
                times[side].append(reply["seconds"])
                losses[side] = reply["loss"]
        peaks = {side: ask(side, "done")["peak_bytes"] for side in workers}
    finally:
        for process, _ in workers.values():
            if process.poll() is None:
                process.kill()
    if workers["lmstack"][1]["threads"] != workers["trl"][1]["threads"]:
        raise RuntimeError(f"thread counts differ: {workers}")
    best = {side: min(t) for side, t in times.items()}
    mib = 2 ** 20
    return {"method": "dpo_speed", "model": f"Llama vocab {VOCAB}, width {WIDTH}, {LAYERS} layers, tied",
            "batch_pairs": PAIRS, "tokens_per_row": f"prompt 48-{PROMPT} + answer 32-{ANSWER}",
            "lmstack_steps_per_s": round(1 / best["lmstack"], 3), "peer_steps_per_s": round(1 / best["trl"], 3),
            "ratio": round(best["trl"] / best["lmstack"], 3),
            "lmstack_peak_mem_mib": round(peaks["lmstack"] / mib, 1), "peer_peak_mem_mib": round(peaks["trl"] / mib, 1),
            "mem_ratio": round(peaks["lmstack"] / peaks["trl"], 3),
            "losses": {k: round(v, 5) for k, v in losses.items()}, "peer": f"trl {__import__('trl').__version__} "
            "DPOTrainer.training_step + AdamW", "steps": args.speed_steps,
            "timing": "best step of each side, sides interleaved", "memory": "peak RSS growth, own process per side",
            **machine(), "threads": workers["lmstack"][1]["threads"]}


# ------------------------------------------------------------------------------------------- main
BENCHES = {"dpo": bench_dpo, "dpo_lora": bench_dpo_lora, "grpo": bench_grpo, "rm": bench_rm, "dpo_speed": bench_dpo_speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(BENCHES), action="append", help="repeatable; default: all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the tiny task models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=300, help="held-out prompts / problems")
    parser.add_argument("--sft-steps", type=int, default=300, help="dpo: SFT steps of the sorted-letters model")
    parser.add_argument("--grpo-sft-steps", type=int, default=475, help="grpo: SFT steps of the arithmetic model "
                        "(475: greedy about 0.5, room to rise; 600: about 0.69)")
    parser.add_argument("--dpo-steps", type=int, default=150)
    parser.add_argument("--dpo-lr", type=float, default=1e-3)
    parser.add_argument("--dpo-lora-lr", type=float, default=1e-3)
    parser.add_argument("--dpo-lora-sft-weight", type=float, default=1.0, help="dpo_lora: dpo.sft_weight")
    parser.add_argument("--dpo-lora-adapter-only", action="store_true",
                        help="dpo_lora: train the adapter alone (no answer-token rows): the unstable setting")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--dpo-sft-weight", type=float, default=0.0, help="dpo, dpo_lora: dpo.sft_weight (RPO's NLL)")
    parser.add_argument("--grpo-steps", type=int, default=200)
    parser.add_argument("--grpo-lr", type=float, default=3e-4)
    parser.add_argument("--grpo-eval-every", type=int, default=50, help="grpo: greedy accuracy every N steps (0: off)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64, help="GRPO prompts per step (64 x 8: many distinct "
                        "problems per step; 16 x 16 improved mostly the problems it trained on)")
    parser.add_argument("--lm-steps", type=int, default=400, help="rm: pretraining steps of the HH language model")
    parser.add_argument("--rm-steps", type=int, default=300)
    parser.add_argument("--rm-lr", type=float, default=3e-4)
    parser.add_argument("--speed-steps", type=int, default=4, help="dpo_speed: timed steps per side (best counts)")
    parser.add_argument("--speed-threads", type=int, default=torch.get_num_threads(), help="dpo_speed: torch threads")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--speed-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_worker:
        speed_worker(args.speed_worker[0], args.speed_worker[1], int(args.speed_worker[2]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="lmstack-align-bench-") as tmp:
        work = args.out or Path(tmp)
        for name in args.method or list(BENCHES):
            (work / name).mkdir(parents=True, exist_ok=True)
            torch.set_num_threads(args.threads if name != "dpo_speed" else torch.get_num_threads())
            print(json.dumps(BENCHES[name](args, work / name)), flush=True)


if __name__ == "__main__":
    main()
