"""Evaluate `python -m fastmem run` over several stream seeds and print a Markdown table for the README.

Each configuration runs the learner on every seed's stream (200 problems by default); per-problem
accuracies are pooled over the seeds and reported with 95% normal-approximation intervals.

    python scripts/evaluate_learner.py --seeds 0 1 2 --configs "--kind soft_prompt" "--kind prefix"
"""
from __future__ import annotations

import argparse
import shlex

from fastmem.cli import add_run_arguments, mean_and_interval, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=[""],
                        help="extra `fastmem run` arguments, one string per configuration")
    options = parser.parse_args()
    run_parser = argparse.ArgumentParser()
    add_run_arguments(run_parser)

    pooled: dict[str, dict[str, list[float]]] = {}
    speed: dict[str, list[float]] = {}
    for config in options.configs:
        for seed in options.seeds:
            summary = run(run_parser.parse_args(["--seed", str(seed), *shlex.split(config)]))
            for name, values in summary.items():
                if isinstance(values, list):
                    pooled.setdefault(name, {}).setdefault(config, []).extend(values)
            speed.setdefault(config, []).append(summary["problems_per_s"])

    configs = options.configs
    print(f"\nseeds {options.seeds}; mean ± 95% CI over all problems of all seeds\n")
    print("| method | " + " | ".join(f"`{c or 'default'}`" for c in configs) + " |")
    print("|---|" + "---|" * len(configs))
    for name, by_config in pooled.items():
        cells = []
        for config in configs:
            mean, half_width = mean_and_interval(by_config[config])
            cells.append(f"{mean:.3f} ± {half_width:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| problems/s | " + " | ".join(f"{sum(speed[c]) / len(speed[c]):.1f}" for c in configs) + " |")


if __name__ == "__main__":
    main()
