"""Where inductor puts a compiled block's exchanges, their waits and the block's independent product, with and
without its compute/communication reordering passes: the order a worker group's compiled blocks run in.

    python benchmarks/cpu_comm_order.py --out /tmp/order          # CPU, two processes over gloo, ~30 s

The block has the shape of a FLUX single block under Ulysses: a projection, an all-to-all of its result, an
attention, an all-to-all back, and an MLP product that depends on neither exchange (the one piece of compute
that could run while an exchange is in flight). Each configuration compiles it in a fresh pair of processes
and records, from inductor's generated code, the order of the matrix products, the collectives and their
waits. That code order is the launch order on a GPU too; the passes decide on cost estimates that differ by
device, so a GPU's compilation may move other things, but a configuration that moves nothing here runs no pass.
Raw output: --out/comm-order.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# The passes PyTorch's inductor config recommends; setting reorder_for_compute_comm_overlap alone runs none,
# as its list of passes is empty by default.
RECOMMENDED_PASSES = [
    "reorder_communication_preserving_peak_memory",
    "sink_waits_iterative",
    "reorder_communication_preserving_peak_memory",
]
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "overlap-flag-only": {"reorder_for_compute_comm_overlap": True},
    "overlap-recommended-passes": {
        "reorder_for_compute_comm_overlap": True,
        "reorder_for_compute_comm_overlap_passes": RECOMMENDED_PASSES,
    },
}
_STEP = re.compile(
    r"^\s*(?:\w+ = )?(torch\.ops\._c10d_functional\.(all_to_all_single|wait_tensor)\.default|extern_kernels\.mm)\("
)


def block(x: Any, w_qkv: Any, w_mlp: Any, w_out: Any, group: Any) -> Any:
    import torch
    import torch.distributed._functional_collectives as funcol

    qkv = x @ w_qkv
    mlp = torch.nn.functional.gelu(x @ w_mlp, approximate="tanh")  # needs neither exchange
    send = qkv.reshape(qkv.shape[0], 2, -1).permute(1, 0, 2).contiguous()
    received = funcol.wait_tensor(funcol.all_to_all_single(send.flatten(), None, None, group)).reshape(
        send.shape
    )
    attention = torch.softmax(received[0] @ received[1].T, -1) @ received[1]
    back = funcol.wait_tensor(funcol.all_to_all_single(attention.flatten(), None, None, group))
    return torch.cat([back.reshape(attention.shape), mlp[: attention.shape[0]]], 1) @ w_out


def order_of(code: str) -> list[str]:
    """The products, exchanges and waits of the generated `call`, in order, named by what they are."""
    steps: list[str] = []
    exchanges = 0
    for line in code[code.index("def call(") :].splitlines():
        match = _STEP.match(line)
        if match is None:
            continue
        if match.group(2) == "all_to_all_single":
            exchanges += 1
            steps.append(f"exchange {exchanges}")
        elif match.group(2) == "wait_tensor":
            if not steps or steps[-1] != f"wait {exchanges}":  # dynamo and the code each wait once
                steps.append(f"wait {exchanges}")
        elif "arg2_1" in line:  # x @ w_mlp: the product that needs no exchange
            steps.append("MLP product")
        else:
            steps.append("product")
    return steps


def rank_main(rank: int, port: int, name: str, out: Path) -> None:
    import torch
    import torch._inductor.config as inductor_config
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for key, value in CONFIGS[name].items():
        setattr(inductor_config, key, value)
    torch.manual_seed(0)
    args = (torch.randn(64, 32), torch.randn(32, 64), torch.randn(32, 128), torch.randn(160, 32))
    compiled = torch.compile(block, fullgraph=True)
    _, codes = run_and_get_code(compiled, *args, dist.group.WORLD)
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps({"config": CONFIGS[name], "order": order_of(codes[0])}))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import torch.multiprocessing as tmp

    from diffuserve.serving.worker_group import free_port

    results: dict[str, Any] = {"torch": torch.__version__, "configs": {}}
    for name in [n for n in args.configs.split(",") if n]:
        tmp.spawn(rank_main, args=(free_port(), name, out), nprocs=2, join=True)
        path = out / f"{name}.json"
        results["configs"][name] = json.loads(path.read_text())
        path.unlink()
        print(f"{name}: {' → '.join(results['configs'][name]['order'])}", flush=True)
    (out / "comm-order.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
