"""Collect fine-tuning runs made outside a sweep into one results file, and print their summary.

Each run folder holds what the CPU run scripts write: ``run/model.json`` (the checkpoint's record:
config, seed, data split, metrics on val and test, command, commit, SHA-256) and ``eval.json``
(``selact eval --split test --json``: the test split's executed and zero-skipping MAC fractions).
A row is the record with those fractions, the eval command and the date. Records written before
they carried the commit take it from the folder's argument, ``FOLDER@COMMIT``.

    python scripts/finetune_record.py runs/vit-plain-s0@a28e7da runs/vit-plain-s1@4bed3aa \\
        --out results/cifar10/cpu-finetune-run7-vit-plain.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

from selact._files import atomic_write_text


def record(argument: str) -> dict:
    """One run's row (``FOLDER`` or ``FOLDER@COMMIT``); a missing or unreadable file is named in
    the error."""
    folder, _, fallback_commit = argument.partition("@")
    folder = Path(folder)
    files = {"record": folder / "run" / "model.json", "eval": folder / "eval.json"}
    loaded = {}
    for name, path in files.items():
        try:
            loaded[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: cannot read the run's {name} ({error})") from error
    row, test = loaded["record"], loaded["eval"]["test"]
    if "commit" not in row and not fallback_commit:
        raise SystemExit(f"{files['record']} names no commit: give the run's as {folder}@COMMIT")
    checkpoint = folder / "run" / row["file"]
    return {
        **row,
        "test_executed_mac_fraction": test["executed_mac_fraction"],
        "test_zero_skip_mac_fraction": test["zero_skip_mac_fraction"],
        "eval_command": f"selact eval --checkpoint {checkpoint} --task {row['data']['task']} "
        f"--model {row['model']} --data {row['data']['data']} --device cpu --split test "
        f"--json {files['eval']}",
        "date": datetime.date.today().isoformat(),
        "commit": row.get("commit", fallback_commit or None),
    }


def summary(rows: list[dict]) -> str:
    """Mean ± std (over seeds) of test and val top-1 in %, and the executed MAC fraction."""

    def spread(values: list[float]) -> str:
        values = [100 * v for v in values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    seeds = ", ".join(str(r["seed"]) for r in rows)
    test = spread([r["metrics"]["test"]["top1"] for r in rows])
    val = spread([r["metrics"]["val"]["top1"] for r in rows])
    executed = statistics.mean(r["test_executed_mac_fraction"] for r in rows)
    return (
        "| seeds | FT epochs | exec/dense (test) | test % | val % |\n|---|---|---|---|---|\n"
        f"| {seeds} | {rows[0]['epochs']} | {executed:.3f} | {test} | {val} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (run/model.json, eval.json)[@COMMIT]")
    parser.add_argument("--out", type=Path, required=True, help="the results JSON to write")
    args = parser.parse_args()
    rows = [record(argument) for argument in args.runs]
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
    print(summary(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
