"""`fusedlis generate`: generate text with a checkpoint or preset and print a latency summary."""

from __future__ import annotations

import argparse
import statistics

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text and report per-token latency",
                       description="Generate text with a Llama checkpoint directory or a preset ('tiny' is "
                                   "embedded). Under torchrun/srun every rank runs it and rank 0 prints.")
    p.add_argument("--model", default="tiny", help="checkpoint directory or preset name (default: tiny)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: 'Hello')")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--kernels", choices=["torch", "triton"], default=None)
    p.add_argument("--random-weights", action="store_true", help="preset shapes with seeded random weights")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fusedlis import Engine
    from fusedlis.engine import _dist_env

    prompts = args.prompt or ["Hello"]
    eng = Engine.from_pretrained(args.model, device=args.device, dtype=_DTYPES.get(args.dtype),
                                 kernels=args.kernels, random_weights=args.random_weights,
                                 max_batch_size=max(len(prompts), 1), max_seq_len=args.max_seq_len)
    results = eng.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed)
    if _dist_env()[0] != 0:
        return 0
    for prompt, r in zip(prompts, results):
        print(f"--- prompt: {prompt!r}")
        print(r.text if r.text is not None else r.token_ids)
    ttft = [r.latencies_s[0] * 1e3 for r in results]
    steps = [t * 1e3 for r in results for t in r.latencies_s[1:]]
    ntok = sum(len(r.token_ids) for r in results)
    m = eng.model
    print(f"--- {m.config.name} on {eng.device} ({str(m.dtype).replace('torch.', '')}, kernels={m.kernels}, "
          f"tp={m.tp.size}); {ntok} tokens for {len(prompts)} prompt(s)")
    print(f"time to first token: {statistics.median(ttft):.2f} ms (median over prompts)")
    if steps:
        med = statistics.median(steps)
        print(f"decode: {med:.2f} ms/token median, {min(steps):.2f} min, {max(steps):.2f} max "
              f"over {len(steps)} steps; {1e3 / med * len(prompts):.1f} tokens/s")
    return 0
