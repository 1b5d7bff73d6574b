"""Run many recipe measurements in parallel (a GPU or a many-core box), one result line each.

    python benchmarks/train_sweep.py GRID --seeds 123,7,42 --parallel 4 --log results.jsonl --device cuda

GRID has one recipe per line: `tag: key=value key=value` (blank lines and # comments skipped);
other options go to benchmarks/train_recipes.py unchanged.
"""

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_grid(path: Path) -> list[tuple[str, list[str]]]:
    grid = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tag, _, overrides = line.partition(":")
            grid.append((tag.strip(), overrides.split()))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path)
    parser.add_argument("--seeds", default="123")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--log", type=Path, required=True)
    args, extra = parser.parse_known_args()
    extra = [arg for arg in extra if arg != "--"]
    jobs = [
        [
            sys.executable,
            str(HERE / "train_recipes.py"),
            "--log",
            str(args.log),
            "--tag",
            tag,
            *extra,
            *overrides,
            f"seed={seed}",
        ]
        for seed in args.seeds.split(",")
        for tag, overrides in read_grid(args.grid)
    ]

    def run(command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        print(
            done.stdout.strip().splitlines()[-1] if done.returncode == 0 else done.stderr[-2000:], flush=True
        )

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(run, jobs))


if __name__ == "__main__":
    main()
