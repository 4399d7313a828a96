"""Does the search learn at the paper's scale? Valid perplexity curves of the PTB search, per order.

    python -m benchmarks.search_quality                                   # CPU: batch 64, 150 steps per order
    python -m benchmarks.search_quality --device cuda                     # GPU: batch 256 (the paper's)
    python -m benchmarks.search_quality --orders first --steps 50 --json out.json
    python -m benchmarks.search_quality --set decoder_bias=unigram input_init_range=1.0   # a variant of the config

The supernet and search are the paper's (300/300, 8 nodes, dropouts 0.75/0.25/0.75/0.2, SGD lr 20 scaled by window,
clip 0.25, weight decay 5e-7, TAR 1e-3, alphas Adam 3e-3) on the whole PTB training split, with the architecture
batches from PTB valid. For each order (plain: weights only; first; second) a fresh supernet from the same seed
runs `--steps` search steps; every `--eval-every` steps (and before the first) it scores the first `--eval-tokens`
valid tokens (`--eval-batch` sequences a batch, 64 by default) and records the genotype and its identity share. The
JSON keeps the curves, the genotypes, the seconds per step and the unigram baseline (687 on PTB: a model of word
frequencies alone). The original code at this configuration scored 8144 / 3038 / 2617 after epochs 1 / 2 / 3 on
one H100 (first order, batch 256) with an all-identity genotype.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import itertools
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from rnn_darts.data import Corpus, load_corpus, unigram_perplexity
from rnn_darts.search import RNNSearchTask, SearchConfig
from rnn_darts.supernet import SupernetConfig
from shared.device import resolve_device
from shared.errors import UserFacingError
from shared.genotypes import to_dict

ORDERS = ("plain", "first", "second")
FIXED = ("order", "batch_size", "eval_tokens", "eval_batch_size", "ntoken")  # not for --set: options of their own


def overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`key=value` items for SearchConfig and SupernetConfig fields (values as Python literals, else strings)."""
    search, model = {}, {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key in FIXED:
            raise SystemExit(f"--set {item}: {key} is the benchmark's own (--orders, --batch, --eval-tokens, "
                             "--eval-batch; ntoken: the vocabulary's size)")
        if key in SearchConfig.__dataclass_fields__:
            search[key] = value
        elif key in SupernetConfig.__dataclass_fields__:
            model[key] = value
        else:
            raise SystemExit(f"--set {item}: {key!r} is no field of SearchConfig or SupernetConfig")
    return search, model


def run_order(corpus: Corpus, order: str, args: argparse.Namespace, device: torch.device,
              search: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """One order's curve: `args.steps` search steps from a fresh supernet (`search` and `model` change the paper's
    SearchConfig and SupernetConfig), evaluated every `args.eval_every`."""
    torch.manual_seed(args.seed)
    config = SearchConfig(**{**search, "batch_size": args.batch, "eval_tokens": args.eval_tokens,
                             "eval_batch_size": args.eval_batch, "order": order})
    task = RNNSearchTask(corpus, SupernetConfig(ntoken=corpus.ntoken, **model), config, device, args.seed)
    steps = itertools.chain.from_iterable(task.steps(task.epoch_windows()) for _ in itertools.count())
    curve, train_losses, seconds = [], [], 0.0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            genotype = task.genotype()
            curve.append({"step": step, **task.evaluate(), **task.genotype_metrics(genotype),
                          "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
                          "genotype": to_dict(genotype)})
            train_losses = []
            print(f"{order:>6} step {step:4d}: valid ppl {curve[-1]['valid_ppl']:9.1f}  identity "
                  f"{curve[-1]['identity_share']:.2f}  ({seconds / max(step, 1):.2f} s/step)", flush=True)
        if step < args.steps:
            start = time.perf_counter()
            _, cross_entropy = next(steps)
            train_losses.append(cross_entropy.item())
            seconds += time.perf_counter() - start
    return {"curve": curve, "seconds_per_step": seconds / args.steps, "final_genotype": curve[-1]["genotype"]}


def _machine() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="PTB folder (default: as the search: $DARTS_DATA_DIR, ...)")
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA (the paper's), 64 on CPU")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-tokens", type=int, default=20_000)
    parser.add_argument("--eval-batch", type=int, default=64,
                        help="sequences per evaluation batch (the paper's 10 gives the search cell's batch-statistics "
                             "BatchNorm too few sequences: see benchmarks/README.md)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change a SearchConfig or SupernetConfig field from the paper's value")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (after every order)")
    args = parser.parse_args(argv)
    search, model = overrides(args.set)  # a bad key fails before any data loads
    if min(args.steps, args.eval_every, args.eval_tokens) < 1 or args.eval_batch < 2:
        parser.error("--steps, --eval-every and --eval-tokens must be positive, --eval-batch at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.batch = args.batch or (256 if device.type == "cuda" else 64)
    try:
        corpus = load_corpus(args.data_dir)
    except UserFacingError as error:
        raise SystemExit(f"search_quality: {error}") from None
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": _machine(),
        "device": str(device), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "unigram_valid_ppl": unigram_perplexity(corpus),
        "unigram_eval_ppl": unigram_perplexity(dataclasses.replace(corpus, valid=corpus.valid[:args.eval_tokens])),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "data_dir")}, "orders": {}}
    for order in args.orders:
        result["orders"][order] = run_order(corpus, order, args, device, search, model)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
