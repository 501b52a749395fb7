"""Paired differences between two arms of label_efficiency.py reports, read by a preregistered rule.

    python benchmarks/paired_difference.py REPORT.json [REPORT.json ...] --arm A --versus B
        [--metrics vrand vrand_matched] [--slices 1 2] [--gain 0.03] [--ahead 6] [--loss 0.01] [--out d.json]

label_efficiency.py measures every arm against scratch and its control; a question such as "does
twice the pretraining give a better encoder?" compares two other arms (the recipe from a 4000-step
pretraining against the recipe from the 2000-step one), which may sit in different reports. This
reads the runs of both arms from the reports (arm names are unique across them: the pretraining and
transfer overrides are in the name), pairs them by replicate (the same labelled slices and seed),
and per labelled-slice count and metric gives the differences A - B: mean, std, how many of the
replicates A is ahead, every value, and the verdict of the rule

    mean >= +gain with >= ahead replicates ahead -> "ahead";  mean <= -loss -> "behind";  else "level".

Both arms must have been fine-tuned with the same --finetune overrides (a paired difference between
budgets or recipes would measure those instead), and every replicate of one arm at a count must
exist for the other: a missing run is refused by name rather than silently dropped.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.label_efficiency import METRICS, replicate_stats  # noqa: E402


class PairingError(ValueError):
    """The two arms cannot be paired (missing arm, replicate or metric; different fine-tuning)."""


def arm_runs(reports: list[dict], arm: str) -> tuple[dict, list[str]]:
    """({n: {replicate: scores}}, finetune_overrides) of `arm` from the first report that has it."""
    for report in reports:
        if arm in report.get("per_run", {}):
            runs = {int(n): {r: run["scores"] for r, run in by_replicate.items()}
                    for n, by_replicate in report["per_run"][arm].items()}
            return runs, report.get("finetune_overrides", [])
    known = sorted({a for report in reports for a in report.get("per_run", {})})
    raise PairingError(f"no report holds the arm {arm!r}; the reports hold {known}")


def paired_differences(a: dict, b: dict, slices: list[int], metrics: list[str]) -> dict:
    """{n: {metric: stats of a - b over the replicates, plus "ahead"}} for runs {n: {replicate: scores}}."""
    table = {}
    for n in slices:
        missing = [(name, n, r) for name, one, other in (("A", a, b), ("B", b, a))
                   for r in sorted(set(other.get(n, {})) - set(one.get(n, {})))]
        if n not in a or n not in b or missing:
            raise PairingError(f"at {n} labelled slices the arms do not have the same replicates "
                               f"(missing: {missing or 'the whole count'})")
        replicates = sorted(a[n])
        table[n] = {}
        for metric in metrics:
            values = [a[n][r][metric] - b[n][r][metric] for r in replicates]
            table[n][metric] = {**replicate_stats(values), "ahead": sum(v > 0 for v in values), "replicates": replicates}
    return table


def verdict(stats: dict, gain: float, ahead: int, loss: float) -> str:
    """The preregistered reading of one row of differences: "ahead", "behind" or "level"."""
    if stats["mean"] >= gain and stats["ahead"] >= ahead:
        return "ahead"
    return "behind" if stats["mean"] <= -loss else "level"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+", help="label_efficiency.py JSON reports")
    parser.add_argument("--arm", required=True, help="arm A (the differences are A - B)")
    parser.add_argument("--versus", required=True, help="arm B")
    parser.add_argument("--metrics", nargs="+", default=["vrand", "vrand_matched"], choices=METRICS)
    parser.add_argument("--slices", type=int, nargs="+", help="labelled-slice counts (default: every count of A)")
    parser.add_argument("--gain", type=float, default=0.03, help="mean difference for 'ahead'")
    parser.add_argument("--ahead", type=int, default=6, help="replicates A must lead for 'ahead'")
    parser.add_argument("--loss", type=float, default=0.01, help="mean difference at or below -loss: 'behind'")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    try:
        reports = [json.loads(path.read_text()) for path in args.reports]
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: cannot read a label_efficiency report: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        (a, a_finetune), (b, b_finetune) = arm_runs(reports, args.arm), arm_runs(reports, args.versus)
        if a_finetune != b_finetune:
            raise PairingError(f"the arms were fine-tuned with different --finetune overrides ({a_finetune} "
                               f"against {b_finetune}); their difference would measure that too")
        table = paired_differences(a, b, args.slices or sorted(a), args.metrics)
    except PairingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    rule = {"gain": args.gain, "ahead": args.ahead, "loss": args.loss}
    result = {"arm": args.arm, "versus": args.versus, "reports": [str(p) for p in args.reports], "rule": rule,
              "differences": {str(n): {m: {**s, "verdict": verdict(s, **rule)} for m, s in row.items()}
                              for n, row in table.items()}}
    for n, row in result["differences"].items():
        for metric, s in row.items():
            print(f"{n} slices, {metric}: {s['mean']:+.3f} ± {s['std']:.3f} ({s['ahead']} of {len(s['values'])} "
                  f"ahead) -> {s['verdict']}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
