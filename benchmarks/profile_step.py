"""Where a model's training step spends its time: device kernels (or XLA ops on a CPU) by total time.

    python benchmarks/profile_step.py --model unet3d            # GPU: the realistic patch
    python benchmarks/profile_step.py --model unet3d --small    # a CPU smoke run

Traces a few steps of benchmarks/models.py's step with jax.profiler, reads the trace back with
jax.profiler.ProfileData and sums event durations by name over the device planes (the host's XLA
op events where there is no device). Prints the top kernels as JSON: name, milliseconds per step,
share of the traced kernel time, calls per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from benchmarks.models import CONVS, MODELS, config_for, parse_field, training_setup
from jaxem import xla


def kernel_times(trace_dir: str) -> dict[tuple[str, str], list[float]]:
    """{(kernel name, HLO op): [durations in ms]} over the device streams of the trace in `trace_dir`
    (on a CPU: the XLA ops on the host's threads)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    lines = [line for plane in data.planes if plane.name.startswith("/device:") and "CPU" not in plane.name
             for line in plane.lines if line.name.startswith("Stream")]
    if not lines:  # a CPU run
        lines = [line for plane in data.planes if plane.name == "/host:CPU"
                 for line in plane.lines if line.name.startswith("tf_XLA")]
    times = collections.defaultdict(list)
    for line in lines:
        for event in line.events:
            if event.name.startswith(("ThreadpoolListener", "ThunkExecutor")):
                continue
            stats = dict(event.stats)
            times[(event.name, str(stats.get("hlo_op", "")))].append(event.duration_ns / 1e6)
    return times


def hlo_line(hlo_text: str, op: str) -> str:
    """The optimized HLO instruction named `op`, shortened (what a fusion or custom call is)."""
    match = re.search(rf"^\s*(ROOT )?%?{re.escape(op)} = (.*)$", hlo_text, re.M) if op else None
    return match.group(2)[:220] if match else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet3d", choices=list(MODELS))
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--convs", default="auto", choices=list(CONVS))
    args = parser.parse_args()
    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg, spatial, batch = config_for(args.model, args.small, dtype, False, dict(parse_field(f) for f in args.set))
    step, _, (params, stats, opt_state, x, y) = training_setup(cfg, spatial, args.batch or batch, CONVS[args.convs])
    compiled = step.lower(params, stats, opt_state, x, y).compile()
    hlo_text = compiled.as_text()
    for _ in range(2):  # warm up
        params, stats, opt_state, loss = compiled(params, stats, opt_state, x, y)
    jax.block_until_ready(loss)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                params, stats, opt_state, loss = compiled(params, stats, opt_state, x, y)
            jax.block_until_ready((params, loss))
        times = kernel_times(trace_dir)
    total = sum(sum(v) for v in times.values())
    ranked = sorted(times.items(), key=lambda kv: -sum(kv[1]))[:args.top]
    print(json.dumps({
        "benchmark": "profile_step", "model": args.model, "convs": args.convs, "input": list(x.shape[:-1]), "dtype": dtype,
        "device": jax.devices()[0].device_kind, "kernel_ms_per_step": total / args.steps,
        "top": [{"kernel": name[:120], "hlo_op": op, "ms_per_step": sum(d) / args.steps,
                 "share": sum(d) / total, "calls_per_step": len(d) / args.steps, "hlo": hlo_line(hlo_text, op)}
                for (name, op), d in ranked],
    }, indent=1))


if __name__ == "__main__":
    xla.set_default_flags()  # the XLA flags `jaxem` commands run with, before JAX starts
    main()
