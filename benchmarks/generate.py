"""Greedy generation with a tiny Llama, before and after ``torch_matgrad.replace_linear``.

Decoding one token at a time through a small model is where the host path is all there
is: every projection is a 1-row GEMM of microseconds. Two copies of one randomly
initialised Llama (hidden 64, 2 layers, built from a config: nothing is downloaded)
generate the same 32 tokens greedily, one copy swapped; the rounds interleave the two
and the medians and their ratio are printed (and appended to ``--out`` as CSV).

    python benchmarks/generate.py --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

import torch_matgrad
from torch_matgrad.bench.environment import environment


def models(hidden: int, layers: int):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        sys.exit("generate.py needs transformers: pip install transformers")
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    swapped = copy.deepcopy(original)
    n = torch_matgrad.replace_linear(swapped)
    return original, swapped, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (default 32)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall (default) or cpu: this process's CPU time, steady on a shared machine")
    parser.add_argument("--out", type=Path, help="CSV file to append the result to")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    original, swapped, n = models(args.hidden, args.layers)
    prompt = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))

    def generate(model):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=0)

    want, got = generate(original), generate(swapped)
    if not torch.equal(want, got):
        print("generate.py: the swapped model generated other tokens", file=sys.stderr)
        return 1
    samples = {"original": [], "swapped": []}
    pair = [("original", original), ("swapped", swapped)]
    for rnd in range(args.rounds):
        for name, model in pair if rnd % 2 == 0 else reversed(pair):
            start = clock()
            generate(model)
            samples[name].append((clock() - start) * 1e3)
    ms = {name: statistics.median(s) for name, s in samples.items()}
    ratio = ms["swapped"] / ms["original"]
    env = environment("cpu")
    print(f"{env['device_name']}; torch {env['torch']}; commit {env['commit']}; {args.clock} time")
    print(f"tiny Llama (hidden {args.hidden}, {args.layers} layers, {n} Linear layers swapped), greedy generate "
          f"{args.new_tokens} tokens, median of {args.rounds}: original {ms['original']:.1f} ms, "
          f"swapped {ms['swapped']:.1f} ms, ratio {ratio:.3f} (same tokens)")
    if args.out:
        new = not args.out.exists()
        with open(args.out, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["date", "commit", "device_name", "torch", "clock", "hidden", "layers", "new_tokens",
                                 "original_ms", "swapped_ms", "ratio"])
            writer.writerow([env["date"], env["commit"], env["device_name"], env["torch"], args.clock, args.hidden,
                             args.layers, args.new_tokens, f"{ms['original']:.2f}", f"{ms['swapped']:.2f}",
                             f"{ratio:.3f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
