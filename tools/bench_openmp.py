"""Side-by-side: small-CNN training step time with OpenMP's PASSIVE vs ACTIVE wait policy.

Why `dgbench` sets OMP_WAIT_POLICY=PASSIVE by default (see dgbench.cli.quiet_openmp): the
policy is read when torch loads, so each setting runs in its own subprocess.

    python tools/bench_openmp.py [steps]
"""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = """
import time, torch
from dgbench.backbones import build_backbone
model = build_backbone({{"arch": "small_cnn"}})
head = torch.nn.Linear(model.n_outputs, 6)
opt = torch.optim.Adam([*model.parameters(), *head.parameters()])
x, y = torch.randn(96, 3, 32, 32), torch.randint(0, 6, (96,))
def step():
    loss = torch.nn.functional.cross_entropy(head(model(x)), y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range({steps}):
    step()
print((time.perf_counter() - start) / {steps})
"""


def step_seconds(policy: str, steps: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(steps=steps)], env=env, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    active, passive = step_seconds("ACTIVE", steps), step_seconds("PASSIVE", steps)
    print(f"threads={os.cpu_count()} steps={steps}")
    print(f"ACTIVE  {active * 1e3:8.1f} ms/step")
    print(f"PASSIVE {passive * 1e3:8.1f} ms/step")
    print(f"ratio ACTIVE/PASSIVE: {active / passive:.2f}x")


if __name__ == "__main__":
    main()
