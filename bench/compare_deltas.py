"""Compare two liftft deltas: are the selections the same, and how far apart are the trained values?

    python bench/compare_deltas.py DIR_A DIR_B [--json FILE] [--tolerance 0.05]

Prints one JSON object: the weights compared, whether every weight trained the same entries, and the largest
relative difference ||a - b|| / ||a|| of a weight's values. Exits 1 when the entries differ or that difference
exceeds --tolerance (gpu_check.sh compares a one-process `liftft train --fsdp` run with an unsharded one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from liftft import load_delta


def compare(a_dir, b_dir) -> dict:
    """{"weights", "same_entries", "max_relative_difference", "worst_weight"} of two delta directories."""
    a, b = load_delta(a_dir), load_delta(b_dir)
    if a.entries.keys() != b.entries.keys():
        raise ValueError(f"{a_dir} and {b_dir} hold different weights")
    same, worst, worst_name = True, 0.0, None
    for name, (idx, values) in a.entries.items():
        other_idx, other = b.entries[name]
        if (idx is None) != (other_idx is None) or (idx is not None and not bool((idx == other_idx).all())):
            same = False
            continue
        relative = float((values - other).norm() / values.norm().clamp_min(1e-30))
        if relative >= worst:
            worst, worst_name = relative, name
    return {"weights": len(a.entries), "same_entries": same, "max_relative_difference": worst,
            "worst_weight": worst_name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a delta directory")
    parser.add_argument("b", help="another delta directory of the same base and weights")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative difference that passes")
    args = parser.parse_args(argv)
    result = {**compare(args.a, args.b), "tolerance": args.tolerance}
    result["pass"] = result["same_entries"] and result["max_relative_difference"] <= args.tolerance
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
