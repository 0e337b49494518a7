"""torchrun worker: TP=WORLD_SIZE engine with every allreduce mode vs the fp32 TP=1 reference (greedy, 32 steps).

Logical node splits: 1 node, one node per GPU, and (4+ GPUs) 2 nodes of WORLD_SIZE/2 GPUs, NVRAR's full shape.
Run: torchrun --nproc-per-node 2 tests/gpu/engine_tp_worker.py CKPT_DIR OUT_JSON
Writes one result per mode to OUT_JSON on rank 0; exits non-zero on any mismatch.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import fusedlis  # noqa: E402
from tests.engine_check import check_against_reference  # noqa: E402

def modes(world: int) -> list[tuple[str, str | None, str]]:
    """(allreduce mode, FUSEDLIS_GPUS_PER_NODE or None for one node, FUSEDLIS_FUSED_TRANSPORT) to check at this
    world size. "put": the fused kernel's inter-node rounds as NVSHMEM puts (the transport between hosts)."""
    from fusedlis.comm.symmetric import nvshmem_available

    out = [("nccl", None, "auto"), ("auto", None, "auto"), ("one_shot", None, "auto"), ("two_shot", None, "auto"),
           ("nvrar", "1", "auto"), ("fused", None, "auto"), ("fused", "1", "auto")]
    if nvshmem_available():
        out.append(("fused", "1", "put"))
    if world >= 4 and world % 2 == 0:
        half = str(world // 2)
        out += [("nvrar", half, "auto"), ("auto", half, "auto"), ("fused", half, "auto")]
        if nvshmem_available():
            out.append(("fused", half, "put"))
    return out


def main() -> int:
    ckpt, out_json = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results, failed = [], False
    for mode, gpn, transport in modes(world):
        if gpn:
            os.environ["FUSEDLIS_GPUS_PER_NODE"] = gpn
        else:
            os.environ.pop("FUSEDLIS_GPUS_PER_NODE", None)
        os.environ["FUSEDLIS_FUSED_TRANSPORT"] = transport
        entry = {"allreduce": mode, "gpus_per_node": int(gpn or world), "transport": transport}
        try:
            eng = fusedlis.Engine.from_pretrained(ckpt, device="cuda", max_batch_size=4, max_seq_len=256,
                                                  allreduce=mode, progress=False)
            ws = getattr(getattr(eng.model.tp, "row_linear", None), "workspace", None)
            entry["fused_transport"] = getattr(ws, "transport", None)  # what the fused kernel really ran
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, eng.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 1)]
            res = eng.generate(prompts, max_new_tokens=32, stop_at_eos=False)
            if dist.get_rank() == 0:
                ref = fusedlis.load_model(ckpt, dtype=torch.float32, device="cuda")
                # bf16-rounded weights in fp32, like the engine's
                ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
                entry["exact"] = [check_against_reference(ref, p, r.token_ids) for p, r in zip(prompts, res)]
                entry["decode_ms"] = [round(1e3 * sorted(r.latencies_s[1:])[len(r.latencies_s[1:]) // 2], 3)
                                      for r in res]
                del ref
            entry["ok"] = True
            del eng
            torch.cuda.empty_cache()
        except Exception:
            entry["ok"], entry["error"] = False, traceback.format_exc()[-3000:]
            failed = True
        results.append(entry)
        print(json.dumps(entry), flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
