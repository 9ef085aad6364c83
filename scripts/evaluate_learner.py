"""Evaluate `python -m fastmem run` over several stream seeds and print a Markdown table for the README.

Each configuration runs the learner on every seed's stream (200 problems by default); per-problem
accuracies are pooled over the seeds and reported with 95% normal-approximation intervals.

    python scripts/evaluate_learner.py --seeds 0 1 2 --configs "--kind soft_prompt" "--kind prefix"

``--json PATH`` also writes the pooled per-problem values (config -> row -> list), and ``--tables``
prints one table from several such files (configurations or seeds measured in separate processes; the
values of a configuration found in several files are pooled).
"""
from __future__ import annotations

import argparse
import json
import shlex

from fastmem.cli import add_run_arguments, gap_closed, mean_and_interval, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=[""],
                        help="extra `fastmem run` arguments, one string per configuration")
    parser.add_argument("--json", help="also write the pooled per-problem values here")
    parser.add_argument("--tables", nargs="+", metavar="JSON",
                        help="print one table from files written by --json, measuring nothing")
    parser.add_argument("--by-config", action="store_true",
                        help="one row per configuration (the learner's rows only), for many configurations")
    options = parser.parse_args()
    if options.tables:
        pooled, speed = {}, {}
        for path in options.tables:
            saved = json.loads(open(path).read())
            for name, by_config in saved["pooled"].items():   # a configuration in several files: seeds pooled
                for config, values in by_config.items():
                    pooled.setdefault(name, {}).setdefault(config, []).extend(values)
            for config, rates in saved["speed"].items():
                speed.setdefault(config, []).extend(rates)
        print_table(pooled, speed, list(speed), "as saved", options.by_config)
        return
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
        if options.json:   # after every configuration, so a long evaluation keeps what it measured
            with open(options.json, "w") as handle:
                json.dump({"seeds": options.seeds, "pooled": pooled, "speed": speed}, handle)
    print_table(pooled, speed, options.configs, options.seeds, options.by_config)


def print_table(pooled: dict[str, dict[str, list[float]]], speed: dict[str, list[float]], configs: list[str],
                seeds, by_config: bool = False) -> None:
    print(f"\nseeds {seeds}; mean ± 95% CI over all problems of all seeds\n")
    if by_config:
        rows = [name for name in pooled if "fastmem" in name or "ICL" in name]
        print("| configuration | " + " | ".join(rows) + " | problems/s |")
        print("|---|" + "---|" * (len(rows) + 1))
        for config in configs:
            cells = ["{:.3f} ± {:.3f}".format(*mean_and_interval(pooled[name][config])) for name in rows]
            print(f"| `{config or 'default'}` | " + " | ".join(cells) + f" | {sum(speed[config]) / len(speed[config]):.1f} |")
        _print_gap_closed(pooled, configs)
        return
    print("| method | " + " | ".join(f"`{c or 'default'}`" for c in configs) + " |")
    print("|---|" + "---|" * len(configs))
    for name, by_config in pooled.items():
        cells = []
        for config in configs:
            mean, half_width = mean_and_interval(by_config[config])
            cells.append(f"{mean:.3f} ± {half_width:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| problems/s | " + " | ".join(f"{sum(speed[c]) / len(speed[c]):.1f}" for c in configs) + " |")
    _print_gap_closed(pooled, configs)


def _print_gap_closed(pooled: dict[str, dict[str, list[float]]], configs: list[str]) -> None:
    """One line per configuration run with ``--resample``: the share of the pass@1 -> maj@N gap closed."""
    for config in configs:
        closed = gap_closed({name: by_config[config] for name, by_config in pooled.items() if config in by_config})
        if closed is not None:
            print(f"\n`{config or 'default'}`: distillation closes {closed[0]:.2f} of the pass@1 → maj@N gap "
                  f"(95% paired bootstrap interval [{closed[1]:.2f}, {closed[2]:.2f}])")


if __name__ == "__main__":
    main()
