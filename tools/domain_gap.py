"""Measure a dataset's domain gap: ERM trained on all domains but one, for each held-out domain.

Prints, per held-out domain, the mean `out`-split accuracy of the training domains (in-domain
validation) next to the accuracy on the unseen domain (its `in` split, DomainBed's test
accuracy), and chance. A DG benchmark needs the first clearly above the second, and the
second clearly above chance.

    python tools/domain_gap.py                       # embedded dataset, default steps
    python tools/domain_gap.py trainer.steps=300 dataset=pacs backbone=resnet18

Extra arguments are Hydra overrides. Runs go to outputs/domain_gap/ and resume like any run.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see dgbench.cli.quiet_openmp

from hydra import compose, initialize_config_dir

from dgbench.cli import conf_dir
from dgbench.components import load_components
from dgbench.records import RESULTS_FILE, read_records
from dgbench.train import train


def main(overrides: list[str]) -> None:
    load_components()
    base = ["name=domain_gap", "trainer.progress=false", *overrides]
    rows, env, n_domains, chance = [], 0, 1, 0.0
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        while env < n_domains:
            run_overrides = [*base, f"dataset.test_envs=[{env}]"]
            result = train(compose("config", overrides=run_overrides), run_overrides)
            record = read_records(result.run_dir / RESULTS_FILE)[-1]
            n_domains, chance = len(result.domains), 1 / result.num_classes
            held_out = result.domains[env]
            val = [record["acc"][d]["out"] for d in result.domains if d != held_out]
            rows.append((held_out, sum(val) / len(val), record["acc"][held_out]["in"], record["step"]))
            env += 1
    print(f"\n{'held-out domain':<18}{'train-domain val':>18}{'unseen domain':>16}{'gap':>8}{'step':>7}")
    for held_out, val, unseen, step in rows:
        print(f"{held_out:<18}{100 * val:>17.1f}%{100 * unseen:>15.1f}%{100 * (val - unseen):>7.1f}{step:>7}")
    print(f"chance: {100 * chance:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
