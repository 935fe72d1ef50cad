"""On a CUDA machine: the FLOP ideal's bf16 matmul at the cube-root width as it was (any integer) and as
`frozenlm.measure.ideal_shape` rounds it (a multiple of 64), for the two steps `gpu_check.sh` times.

    python benchmarks/gpu_ideal_alignment.py OUT.json [FLOPS ...]

Default FLOPs: those `gpu_check.sh` counted for `imagenet_deit_small_llama` at batch 256 and
`ssv2_videomae_small_llama` at batch 24 (docs/performance/gpu_check/*.json). Median of 5 after a warm-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from frozenlm.measure import ideal_shape, median_seconds  # noqa: E402


def median_ms(m: int, n: int, flops: int) -> float:
    """Median time of `[m, n] @ [n, n].T` in bf16, scaled to `flops` (as the ideal is)."""
    a = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    seconds = median_seconds(lambda: torch.matmul(a, w.mT, out=out), torch.device("cuda"), 5)
    return seconds * flops / (2 * m * n * n) * 1e3


def main() -> None:
    flops_list = [int(f) for f in sys.argv[2:]] or [49471590694912, 86493880565760]
    rows = []
    for flops in flops_list:
        n_any = max(1, round((flops / 2) ** (1 / 3)))
        shapes = {"any": (max(1, round(flops / (2 * n_any * n_any))), n_any), "multiple_of_64": ideal_shape(flops)}
        for label, (m, n) in shapes.items():
            ms = median_ms(m, n, flops)
            rows.append({"flops": flops, "width": label, "m": m, "n": n, "ideal_ms": ms, "tflops": flops / ms / 1e9})
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    Path(sys.argv[1]).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
