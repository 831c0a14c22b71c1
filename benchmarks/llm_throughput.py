"""Throughput of every LLM path, as a fraction of this machine's matmul peak measured in the same run.

    python -m benchmarks.llm_throughput                       # embedded LLM(s), fp32 and (if the CPU has it) bf16
    python -m benchmarks.llm_throughput --llms SmolLM2-135M-Instruct --dtypes float32 --repeats 3

Paths: the frozen LLM's forward (8 x 400 tokens); candidate scoring per user (a 400-token prompt
and 20 candidates of 10 tokens) by the earlier KV-cache path and by the one-pass branch path; a
stage-2 sample (forward and backward to the soft tokens at the input, 4 x 462 tokens) with autograd
anomaly mode on (what every run with a RecBole sequential backbone got before the plugin undid
RecBole's switch) and off; the A/B judge prompt; text encoding; RecBole's SASRec train step on
ml-100k with anomaly mode on and off. Times are the best of ``--repeats``; FLOPs are counted from
the model's shapes (2 x multiply-adds of the linear layers and attention, the LM head only where
logits are computed; a backward to the inputs costs the forward's FLOPs again, weights are frozen).
Writes the table to ``--out`` (results/llm_throughput.md) with the CPU model and its flags.
"""
import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import FLAGS, cpu_description, write_report
from recbole_llm.config import Config
from recbole_llm.fast_kernels import use_fast_kernels
from recbole_llm.llm import models
from recbole_llm.llm.encoder import TextEmbedder
from recbole_llm.llm.judge import LLMJudge
from recbole_llm.llm.scoring import score_branches, score_continuations, target_token_loss
from recbole_llm.quick_start import build_model, prepare
from recbole_llm.utils import get_trainer

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def best_time(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def times_by_anomaly_mode(fn, repeats):
    """``{True: seconds, False: seconds}``: ``fn`` timed with autograd anomaly mode on, then off."""
    times = {}
    for anomaly in (True, False):
        torch.autograd.set_detect_anomaly(anomaly)
        try:
            times[anomaly] = best_time(fn, repeats)
        finally:
            torch.autograd.set_detect_anomaly(False)
    return times


def anomaly_variant(anomaly):
    return f"anomaly mode {'on (earlier)' if anomaly else 'off'}"


def matmul_peak(dtype, repeats, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / best_time(lambda: a @ b, max(repeats, 10))


class FlopCounter:
    """FLOPs of a decoder LLM from its shapes."""

    def __init__(self, llm):
        head = llm.get_output_embeddings()
        self.body = sum(m.weight.numel() for m in llm.modules()
                        if isinstance(m, torch.nn.Linear) and m is not head)
        config = llm.config
        self.head = head.weight.numel()
        self.layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention_width = config.num_attention_heads * head_dim

    def forward(self, tokens, attended_pairs, logit_positions):
        """``tokens`` processed, ``attended_pairs`` (query, key) pairs per layer, logits computed."""
        return 2 * self.body * tokens + 4 * self.layers * self.attention_width * attended_pairs + 2 * self.head * logit_positions


def random_prompt(llm, length, generator):
    embed = llm.get_input_embeddings()
    ids = torch.randint(100, 5000, (length,), generator=generator)
    return embed(ids).detach()


def llm_rows(name, dtype_name, repeats):
    llm, tokenizer = models.load_causal_lm(name, dtype_name)
    count = FlopCounter(llm)
    generator = torch.Generator().manual_seed(0)
    rows = []

    def row(path, variant, seconds, flops, unit, per):
        rows.append({"llm": name, "dtype": dtype_name, "path": path, "variant": variant,
                     "seconds": seconds / per, "unit": unit, "tflops": flops / seconds / 1e12})

    # forward, 8 x 400 tokens
    ids = torch.randint(100, 5000, (8, 400), generator=generator)
    with torch.no_grad():
        seconds = best_time(lambda: llm(input_ids=ids, logits_to_keep=1), repeats)
    row("forward 8 x 400 tokens", "-", seconds, count.forward(3200, 8 * 400 * 401 / 2, 8), "s per batch", 1)

    # candidate scoring: 4 users, each a 400-token prompt + 20 candidates of 10 tokens
    users = [(random_prompt(llm, 400, generator),
              [torch.randint(100, 5000, (10,), generator=generator).tolist() for _ in range(20)]) for _ in range(4)]
    pairs = 400 * 401 / 2 + 200 * 400 + 20 * 10 * 11 / 2
    flops = 4 * count.forward(600, pairs, 201)
    with torch.no_grad():
        cached = best_time(lambda: [score_continuations(llm, p, c, batch_size=32) for p, c in users], repeats)
        branches = best_time(lambda: [score_branches(llm, [p], [c]) for p, c in users], repeats)
        batched = best_time(lambda: score_branches(llm, [u[0] for u in users], [u[1] for u in users]), repeats)
    row("candidate scoring (400 + 20 x 10 tokens)", "kv_cache (earlier)", cached, flops, "s per user", 4)
    row("candidate scoring (400 + 20 x 10 tokens)", "branches, 1 user per pass", branches, flops, "s per user", 4)
    row("candidate scoring (400 + 20 x 10 tokens)", "branches, 4 users per pass", batched, flops, "s per user", 4)

    # stage-2 sample: forward + backward to soft tokens, 4 x (450 prompt + 12 target tokens)
    prompts = [random_prompt(llm, 450, generator) for _ in range(4)]
    targets = [torch.randint(100, 5000, (12,), generator=generator).tolist() for _ in range(4)]

    def stage2_step():
        soft = [p.clone().requires_grad_(True) for p in prompts]
        target_token_loss(llm, soft, targets).backward()

    flops = 2 * 4 * count.forward(462, 462 * 463 / 2, 13)
    for anomaly, seconds in times_by_anomaly_mode(stage2_step, repeats).items():
        row("stage-2 fwd+bwd (4 x 462 tokens)", anomaly_variant(anomaly), seconds, flops, "s per sample", 4)

    # the A/B judge: 16 prompts (8 pairs x 2 orders) of one user's ~10 history titles
    titles = [f"Movie number {i} ({1990 + i % 9})" for i in range(200)]
    judge = LLMJudge(name, [list(range(i, i + 10)) for i in range(0, 160, 10)], titles, dtype=dtype_name, batch_size=8)
    prefix, after = judge.prompt_parts(titles[:10])
    texts = [prefix + judge.options(titles[100 + k], titles[150 + k]) + after for k in range(16)]
    lengths = [len(tokenizer.encode(t)) for t in texts]
    path = f"A/B judge prompt (~{sum(lengths) // 16} tokens)"
    seconds = best_time(lambda: judge.option_logprobs([[t] for t in texts]), repeats)  # groups of one: no sharing
    row(path, "one prompt per row (earlier)", seconds, count.forward(sum(lengths), sum(n * (n + 1) / 2 for n in lengths), 16),
        "s per prompt", 16)
    shared = len(tokenizer.encode(prefix))  # about: the tokenizer may merge across the cut
    branches = [n - shared for n in lengths]
    seconds = best_time(lambda: judge.option_logprobs([texts]), repeats)
    row(path, "history shared, options as branches", seconds,
        count.forward(shared + sum(branches), shared * (shared + 1) / 2 + sum(b * (shared + (b + 1) / 2) for b in branches), 16),
        "s per prompt", 16)
    return rows


def encoder_row(repeats):
    embedder = TextEmbedder("all-MiniLM-L6-v2")
    texts = [f"Movie number {i} ({1990 + i % 9}). Genres: Comedy, Drama, Thriller." for i in range(512)]
    seconds = best_time(lambda: embedder.encode(texts), repeats)
    return {"llm": "all-MiniLM-L6-v2", "dtype": "float32", "path": "text encoding (512 item texts)", "variant": "-",
            "seconds": seconds / 512, "unit": "s per text", "tflops": float("nan")}


def sasrec_rows(repeats):
    """SASRec's train step with RecBole's layers (anomaly mode on, then off), then with the
    plugin's fast kernels (``recbole_llm.fast_kernels``, anomaly mode off)."""
    config = Config(model="SASRec", dataset="ml-100k", config_dict={
        "train_batch_size": 2048, "MAX_ITEM_LIST_LENGTH": 20, "show_progress": False, "state": "ERROR",
        "fast_kernels": False}, command_line=False)
    _, train_data, _, _ = prepare(config)
    model = build_model(config, train_data)
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model)
    batches = [batch for _, batch in zip(range(4), train_data)]
    model.train()

    def steps():
        for batch in batches:
            trainer.optimizer.zero_grad()
            model.calculate_loss(batch).backward()
            trainer.optimizer.step()

    def sasrec_row(variant, seconds):
        return {"llm": "SASRec (RecBole)", "dtype": "float32", "path": "train step, ml-100k, batch 2048, length 20",
                "variant": variant, "seconds": seconds / 4, "unit": "s per step", "tflops": float("nan")}

    rows = [sasrec_row(anomaly_variant(anomaly) + ", RecBole's layers", seconds)
            for anomaly, seconds in times_by_anomaly_mode(steps, repeats).items()]
    use_fast_kernels(model)
    rows.append(sasrec_row("anomaly mode off, fast kernels (fused GELU, torch.rand dropout)", best_time(steps, repeats)))
    return rows


def table(rows):
    lines = ["| model | dtype | path | variant | time | TFLOP/s | % of the dtype's peak | speed-up vs earlier |",
             "|---|---|---|---|---|---|---|---|"]
    earlier = {}
    for r in rows:
        key = (r["llm"], r["dtype"], r["path"])
        earlier.setdefault(key, r["seconds"])
        speedup = earlier[key] / r["seconds"]
        tflops = "-" if r["tflops"] != r["tflops"] else f"{r['tflops']:.3f}"
        peak = "-" if r["peak"] != r["peak"] else f"{100 * r['peak']:.0f}%"
        lines.append(f"| {r['llm']} | {r['dtype']} | {r['path']} | {r['variant']} | {r['seconds']:.3f} {r['unit']} | "
                     f"{tflops} | {peak} | {speedup:.2f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llms", nargs="+", default=["SmolLM2-135M-Instruct"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: float32, plus bfloat16 on CPUs with native bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "llm_throughput.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    dtypes = args.dtypes or ["float32"] + (["bfloat16"] if models.cpu_supports_bf16() else [])
    cpu, flags = cpu_description()
    peaks_before = {name: matmul_peak(DTYPES[name], args.repeats) for name in dtypes}
    rows = []
    for name in args.llms:
        for dtype in dtypes:
            rows += [(dtype, row) for row in llm_rows(name, dtype, args.repeats)]
    rows += [("float32", encoder_row(args.repeats))] + [("float32", row) for row in sasrec_rows(args.repeats)]
    peaks_after = {name: matmul_peak(DTYPES[name], args.repeats) for name in dtypes}
    # The machine's clock and neighbours vary during a run: the peak is the better of the two.
    peaks = {name: max(peaks_before[name], peaks_after[name]) for name in dtypes}
    for dtype, row in rows:
        row["peak"] = row["tflops"] * 1e12 / peaks[dtype]
    rows = [row for _, row in rows]
    command = "python -m benchmarks.llm_throughput " + shlex.join(sys.argv[1:])  # quoted, so the command can be pasted
    lines = [
        "# LLM paths: throughput as a fraction of this machine's matmul peak", "",
        f"Command: `{command}`", "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {args.threads} torch threads; flags: {', '.join(flags) or 'none of ' + ', '.join(FLAGS)}; "
        f"torch {torch.__version__}.",
        "Matmul peak (2048^3, best of runs) at the start / end of the run: " + ", ".join(
            f"{name} {peaks_before[name] / 1e12:.3f} / {peaks_after[name] / 1e12:.3f} TFLOP/s" for name in dtypes)
        + "; percentages use the better of the two.",
        f"Times: best of {args.repeats} after a warm-up. 'speed-up vs earlier' divides the first variant's time of "
        "a path (the earlier code path) by each variant's.", "",
        table(rows), "",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
