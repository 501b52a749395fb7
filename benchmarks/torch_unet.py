"""A jaxem U-Net training step side by side with its PyTorch twin: same layers, parameter count and
FLOPs, run the way a PyTorch user would (channels-last, bf16 autocast on GPUs, cudnn.benchmark,
and with --modes compiled also torch.compile).

    python benchmarks/torch_unet.py --models unet3d unet3d_wide [--modes eager compiled]   # a GPU
    python benchmarks/torch_unet.py --small                                     # a CPU smoke run

One step = forward + backward of a BCE loss + an SGD (momentum 0.9) update on a random batch, as in
benchmarks/models.py, whose jaxem numbers this reuses. The twin covers the U-Net's conv encoder with
plain or residual blocks, group/instance/batch/no norm and the five activations; MFU for both uses
jaxem's exact count of the step's multiply-adds. Needs torch (not a jaxem dependency).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import models as jaxem_bench
from jaxem import xla
from jaxem.models import layers, unet


def _torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("benchmarks/torch_unet.py needs torch (pip install torch); jaxem itself does not.") from None
    return torch


def build_twin(cfg):
    """The PyTorch module computing what `jaxem.models.build(cfg)` computes for a U-Net config,
    channels-first: (B, C_in, *S) -> (B, out_channels, *S) float32. Submodule names follow the
    flax parameter tree (encoder.level0.0.conv, dec1..., up1, head) for `load_flax_variables`."""
    torch = _torch()
    nn = torch.nn
    if cfg.name != "unet" or cfg.encoder != "conv" or cfg.bottleneck != "none" or cfg.deep_supervision:
        raise SystemExit("the torch twin covers the U-Net with its conv encoder, no bottleneck and no deep supervision.")
    if cfg.norm not in ("group", "instance", "batch", "none"):
        raise SystemExit(f"the torch twin has no norm {cfg.norm!r} (group, instance, batch, none).")
    ndim, widths = cfg.ndim, tuple(cfg.widths)
    conv_cls, up_cls = (nn.Conv3d, nn.ConvTranspose3d) if ndim == 3 else (nn.Conv2d, nn.ConvTranspose2d)
    kernels = layers.per_level(cfg.kernel_sizes, len(widths), ndim, 3, "kernel_sizes")
    pools = unet.pool_factors(cfg)
    acts = {"relu": nn.ReLU, "gelu": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
            "leaky_relu": lambda: nn.LeakyReLU(0.01), "elu": nn.ELU}

    def norm(c):  # flax's epsilons: GroupNorm 1e-6, BatchNorm 1e-5 with momentum 0.9
        if cfg.norm == "group":
            return nn.GroupNorm(layers.group_count(c, cfg.groups), c, eps=1e-6)
        if cfg.norm == "instance":
            return nn.GroupNorm(c, c, eps=1e-6)
        if cfg.norm == "batch":
            return (nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d)(c, eps=1e-5, momentum=0.1)
        return nn.Identity()

    class ConvNormAct(nn.Module):
        def __init__(self, c_in, c_out, kernel, act=True):
            super().__init__()
            if any(k % 2 == 0 for k in kernel):
                raise SystemExit(f"the torch twin needs odd kernels (SAME padding), got {kernel}.")
            self.conv = conv_cls(c_in, c_out, kernel, padding=tuple(k // 2 for k in kernel), bias=cfg.norm == "none")
            self.norm = norm(c_out)
            self.act = acts[cfg.activation]() if act else nn.Identity()

        def forward(self, x):
            return self.act(self.norm(self.conv(x)))

    class Block(nn.Module):
        def __init__(self, c_in, c_out, kernel):
            super().__init__()
            residual = cfg.block == "residual"
            n = cfg.convs_per_block
            self.convs = nn.ModuleList([ConvNormAct(c_in if i == 0 else c_out, c_out, kernel,
                                                    act=not (residual and i == n - 1)) for i in range(n)])
            self.residual = residual
            self.project = ConvNormAct(c_in, c_out, (1,) * ndim, act=False) if residual and c_in != c_out else nn.Identity()
            self.act = acts[cfg.activation]()

        def forward(self, x):
            y = x
            for layer in self.convs:
                y = layer(y)
            return self.act(self.project(x) + y) if self.residual else y

    class TwinUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pools = [nn.Identity() if all(f == 1 for f in p) else (nn.MaxPool3d if ndim == 3 else nn.MaxPool2d)(p)
                          for p in pools]
            self.encoder = nn.ModuleDict({f"level{i}": Block(1 if i == 0 else widths[i - 1], w, kernels[i])
                                          for i, w in enumerate(widths)})
            self.up = nn.ModuleDict({f"up{i}": up_cls(widths[i + 1], widths[i], pools[i], stride=pools[i])
                                     for i in range(len(widths) - 1)})
            self.dec = nn.ModuleDict({f"dec{i}": Block(2 * widths[i], widths[i], kernels[i]) for i in range(len(widths) - 1)})
            self.head = conv_cls(widths[0], cfg.out_channels, 1)

        def forward(self, x):
            features = []
            for i in range(len(widths)):
                x = self.encoder[f"level{i}"](x if i == 0 else self.pools[i - 1](x))
                features.append(x)
            y = features[-1]
            for i in reversed(range(len(widths) - 1)):
                y = self.dec[f"dec{i}"](torch.cat([features[i], self.up[f"up{i}"](y)], dim=1))
            with torch.autocast(y.device.type, enabled=False):  # jaxem's head runs in float32
                return self.head(y.float())

    return TwinUNet()


def load_flax_variables(twin, variables: dict) -> None:
    """Copies a jaxem U-Net's flax variables into its twin (kernels to channels-first; the
    transposed convs' kernels flipped, as lax.conv_transpose flips them)."""
    torch = _torch()
    params, stats = variables["params"], variables.get("batch_stats", {})

    def tensor(array):
        return torch.from_numpy(np.array(array))  # a writable copy

    def conv(module, p):
        module.weight.data = tensor(np.moveaxis(np.asarray(p["kernel"]), (-1, -2), (0, 1)))
        if module.bias is not None:
            module.bias.data = tensor(p["bias"])

    def conv_norm_act(module, p, s):
        conv(module.conv, p["Conv_0"])
        if "Norm_0" not in p:
            return
        (kind, values), = p["Norm_0"].items()
        module.norm.weight.data = tensor(values["scale"])
        module.norm.bias.data = tensor(values["bias"])
        if kind.startswith("BatchNorm"):
            running = s["Norm_0"][kind]
            module.norm.running_mean.data = tensor(running["mean"])
            module.norm.running_var.data = tensor(running["var"])

    def block(module, p, s):
        for i, layer in enumerate(module.convs):
            conv_norm_act(layer, p[f"ConvNormAct_{i}"], s.get(f"ConvNormAct_{i}", {}))
        if not isinstance(module.project, torch.nn.Identity):
            n = len(module.convs)
            conv_norm_act(module.project, p[f"ConvNormAct_{n}"], s.get(f"ConvNormAct_{n}", {}))

    for name, module in twin.encoder.items():
        block(module, params["encoder"][name], stats.get("encoder", {}).get(name, {}))
    for name, module in twin.dec.items():
        block(module, params[name], stats.get(name, {}))
    for name, module in twin.up.items():
        k = np.asarray(params[name]["kernel"])
        k = np.flip(k, tuple(range(k.ndim - 2)))
        module.weight.data = tensor(np.moveaxis(k, (-2, -1), (0, 1)))
        module.bias.data = tensor(params[name]["bias"])
    conv(twin.head, params["head"]["Conv_0"])


def bench_twin(cfg, spatial, batch: int, steps: int, dtype: str, compile_: bool) -> dict:
    """Seconds per training step of the twin on torch's best device (CUDA if present)."""
    torch = _torch()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last_3d if cfg.ndim == 3 else torch.channels_last
    model = build_twin(cfg).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 1, *spatial, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, cfg.out_channels, *spatial, device=device) > 0.5).float()
    bf16 = dtype == "bfloat16"
    forward = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up: cuDNN autotuning, torch.compile
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    return {"torch": torch.__version__, "torch_device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "compile": compile_, "step_s": step_s, "warmup_s": warmup_s, "loss": loss.item(),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    import jax

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet3d", "unet3d_wide"],
                        choices=[m for m in jaxem_bench.MODELS if m.startswith("unet") and "resnet" not in m])
    parser.add_argument("--small", action="store_true", help="tiny widths and inputs: a smoke run")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, 2 with --small)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="how PyTorch runs the twin: eager and/or under torch.compile")
    args = parser.parse_args()
    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    steps = args.steps or (2 if args.small else 20)
    peak = jaxem_bench.peak_flops(device)
    results = []
    for name in args.models:
        ours = jaxem_bench.bench(name, args.small, dtype, False, steps, args.batch)
        cfg, spatial, batch = jaxem_bench.config_for(name, args.small, dtype, False)
        batch = args.batch or batch
        record = {"model": name, "input": [batch, *spatial], "dtype": dtype, "params": ours["params"],
                  "model_flops": ours["model_flops"], "jaxem_step_s": ours["step_s"], "jaxem_mfu": ours["mfu"]}
        for compile_ in [mode == "compiled" for mode in args.modes]:
            theirs = bench_twin(cfg, spatial, batch, steps, dtype, compile_)
            if theirs["params"] != ours["params"]:
                raise SystemExit(f"{name}: the twin has {theirs['params']} parameters, jaxem's model {ours['params']}.")
            key = "torch_compiled" if compile_ else "torch"
            record[key] = {**theirs, "mfu": ours["model_flops"] / theirs["step_s"] / peak if peak else None}
            record[f"jaxem_speedup_over_{key}"] = theirs["step_s"] / ours["step_s"]
        results.append(record)
    print(json.dumps({"benchmark": "torch_unet", "device": device.device_kind, "host": platform.node(),
                      "jax": jax.__version__, "peak_bf16_flops_per_s": peak, "results": results}, indent=2))


if __name__ == "__main__":
    xla.set_default_flags()  # the XLA flags `jaxem` commands run with, before JAX starts
    main()
