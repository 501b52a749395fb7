"""Do the scratch and recipe runs of a label_efficiency report repeat on another machine?

    python benchmarks/results/2026-12-08_cpu/diagnostics/reproduce_2000.py NEW.json COMMITTED.json [--slices 2]

Pairs every arm the two reports share by labelled-slice count and replicate, and prints JSON: per arm
and score the largest absolute difference, and every pair. (paired_difference.py pairs two different
arms; this pairs an arm with itself across reports.)
"""

import argparse
import json

SCORES = ("vrand", "vrand_tuned", "vrand_matched", "membrane_ap", "iou")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new")
    parser.add_argument("committed")
    parser.add_argument("--slices", nargs="+", default=["2"])
    args = parser.parse_args()
    new, old = (json.load(open(path))["per_run"] for path in (args.new, args.committed))
    report = {"new": args.new, "committed": args.committed, "arms": {}}
    for arm in sorted(new.keys() & old.keys()):
        pairs = {f"{n}/{r}": {k: [new[arm][n][r]["scores"][k], old[arm][n][r]["scores"][k]] for k in SCORES}
                 for n in args.slices for r in sorted(new[arm].get(n, {}).keys() & old[arm].get(n, {}).keys())}
        report["arms"][arm] = {"replicates": len(pairs),
                               "max_abs_difference": {k: max(abs(a - b) for a, b in (p[k] for p in pairs.values()))
                                                      for k in SCORES},
                               "pairs": pairs}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
