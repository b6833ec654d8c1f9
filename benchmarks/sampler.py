"""Benchmark: cost of one differentiable sampling call per gradient mode (issue 2).

One measured call = encode "a photo of a [x]" with a free vector for [x] (requires grad), DDIM with
classifier-free guidance 7.5, VAE decode, a scalar loss on the image, and backward to the initial
latent AND to the [x] vector. Reported per step count, per gradient mode (full, last_k k=5, residual
at step 0.5 with weight 1), with and without per-step activation checkpointing:

* time: median of ``--repeats`` timed calls (after one untimed call that also measures memory);
* saved MiB: the peak of the bytes autograd holds in saved tensors (a ``saved_tensors_hooks`` pack
  hook; each storage counted once, frozen weights excluded, released when autograd frees them;
  includes the per-step recomputation of checkpointed steps during backward). Deterministic.
  It does not count transient activations of steps that run without a graph, nor gradient buffers;
* on CUDA also peak MiB: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Stacks (random weights; only the shapes matter for cost):
  tiny  ``build_tiny()``: UNet (32, 64), 32x32x4 latents, 64 px images (the default)
  small UNet (64, 128, 256), 32x32x4 latents, VAE x8 -> 256 px images (slow on a CPU: minutes)
  sd15  Stable Diffusion 1.5 shapes: UNet 860M, VAE (128, 256, 512, 512), CLIP-L text encoder, 512 px
        (GPU work; ``--construct-only`` checks that it builds, e.g. on a CPU)
  sdxl  Stable Diffusion XL base 1.0 shapes: UNet 2.6B (text_time conditioning), VAE (128, 256, 512, 512)
        decoded in float32 (force_upcast), CLIP-L + OpenCLIP bigG text encoders, EulerDiscrete, 1024 px;
        VAE-decoder checkpointing follows ``--checkpoint`` (the SDXL default, configs/models/sdxl.yaml)

``--plain`` also times one plain ``pipeline(...)`` call per step count (no graph, as a user generates an image)
and adds the ratio of each differentiable call to it.

Examples::

    python benchmarks/sampler.py                                   # tiny, 10,25,50 steps, 3 repeats
    python benchmarks/sampler.py --stack small --steps 10 --repeats 1
    python benchmarks/sampler.py --stack sd15 --device cuda --steps 10,25,50
    python benchmarks/sampler.py --stack sd15 --construct-only     # builds on CPU, runs nothing
    python benchmarks/sampler.py --stack sdxl --construct-only     # shapes only (meta device): no memory
    python benchmarks/sampler.py --stack sdxl --device cuda --dtype float16 --steps 25,50 --repeats 1 --plain
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from stacks import STACKS  # benchmarks/stacks.py: this script's folder is on sys.path when it runs
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from sage_lightning.models import DiffusionModel
from sage_lightning.sampler import DiffusionSampler, FullGradient, GradientMode, LastKGradient, ResidualGradient
from sage_lightning.text import prompt_encoder, slot

PROMPT = f"a photo of a {slot('x')}"
GUIDANCE = 7.5
MIB = 2**20


def image_size(model: DiffusionModel) -> int:
    return model.image_size


def describe(model: DiffusionModel) -> str:
    count = {type(m).__name__: sum(p.numel() for p in m.parameters()) / 1e6 for m in model.modules()}
    sizes = ", ".join(f"{name} {n:.2f}M" for name, n in count.items())
    return (
        f"{model.name}: {sizes} params; latents {model.unet.config.sample_size}x{model.unet.config.sample_size}"
        f"x{model.unet.config.in_channels}, images {image_size(model)} px; {type(model.scheduler).__name__}"
    )


# ------------------------------------------------------------------------------ saved-tensor meter
class _Packed:
    """What autograd keeps instead of a saved tensor; releases its bytes from the meter when dropped."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int | None, meter: SavedTensorMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        if self.key is not None:
            self.meter.release(self.key)


class SavedTensorMeter:
    """Peak bytes held by autograd's saved tensors (each storage once; ``exclude`` storages not counted)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> _Packed:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return _Packed(tensor, None, self)
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [1, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        return _Packed(tensor, key, self)

    @staticmethod
    def unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# ------------------------------------------------------------------------------------ measurement
@dataclass
class Result:
    steps: int
    mode: str
    checkpoint: bool
    seconds: float | None  # None: out of memory
    runs: list[float]
    saved_mib: float | None
    cuda_peak_mib: float | None = None


MODES: dict[str, Callable[[bool, bool], GradientMode]] = {
    "full": lambda ckpt, dec: FullGradient(checkpoint=ckpt, decoder_checkpoint=dec),
    "last_k": lambda ckpt, dec: LastKGradient(k=5, checkpoint=ckpt, decoder_checkpoint=dec),
    "residual": lambda ckpt, dec: ResidualGradient(step=0.5, weight=1.0, checkpoint=ckpt, decoder_checkpoint=dec),
}
MODE_LABELS = {"full": "full", "last_k": "last_k (k=5)", "residual": "residual (step 0.5, w=1)"}


class Bench:
    def __init__(self, model: DiffusionModel, device: torch.device, dtype: torch.dtype, batch: int) -> None:
        self.model, self.device, self.dtype, self.batch = model, device, dtype, batch
        self.encoder = prompt_encoder(model)
        with torch.no_grad():
            self.uncond = self.encoder.unconditional()  # the pipeline's (SDXL: zeros)
        size = model.unet.config.sample_size
        generator = torch.Generator().manual_seed(0)
        self.z = torch.randn(batch, model.unet.config.in_channels, size, size, generator=generator)
        self.z = self.z.to(device, dtype).requires_grad_(True)
        self.e_x = (0.01 * torch.randn(self.encoder.embed_dim, generator=generator)).to(device, dtype)
        self.e_x.requires_grad_(True)
        weights = [p for m in model.modules() for p in (*m.parameters(), *m.buffers())]
        self.weight_storages = {p.untyped_storage().data_ptr() for p in weights}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, sampler: DiffusionSampler) -> None:
        """One forward + backward; leaves the gradients in ``z.grad`` and ``e_x.grad``."""
        self.z.grad = self.e_x.grad = None
        cond = self.encoder([PROMPT] * self.batch, {"x": self.e_x})
        images = sampler(self.z, cond, self.uncond)
        weights = torch.linspace(-1, 1, images[0].numel(), device=images.device, dtype=images.dtype)
        loss = (images * weights.reshape(images.shape[1:])).sum()
        loss.backward()

    def check_gradients(self, label: str) -> None:
        for name, grad in (("z", self.z.grad), ("[x]", self.e_x.grad)):
            if grad is None or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
                print(f"warning: {label}: gradient to {name} is missing, zero or not finite", file=sys.stderr)

    def plain(self, steps: int, repeats: int) -> float:
        """Median seconds of one plain pipeline call (no graph, same latents, steps and guidance)."""
        pipe = self.model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        kwargs = getattr(self.model, "pipeline_kwargs", dict)()
        runs = []
        for _ in range(repeats + 1):  # the first call warms up
            self.sync()
            start = time.perf_counter()
            with torch.no_grad():
                pipe([PROMPT.replace(slot("x"), "dog")] * self.batch, latents=self.z.detach(),
                     num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="pt", **kwargs)
            self.sync()
            runs.append(time.perf_counter() - start)
        print(f"{steps} steps, plain pipeline call: runs {', '.join(f'{r:.2f}' for r in runs[1:])} s",
              file=sys.stderr, flush=True)
        return statistics.median(runs[1:])

    def measure(self, steps: int, mode: str, ckpt: bool, repeats: int, decoder: bool = False) -> Result:
        grad_mode = MODES[mode](ckpt, decoder and ckpt)
        sampler = DiffusionSampler(self.model, num_steps=steps, guidance_scale=GUIDANCE, grad_mode=grad_mode)
        label = f"{steps} steps, {mode}, checkpoint={ckpt}"
        try:
            # First call (untimed, also a warm-up): saved-tensor peak, and the CUDA peak.
            meter = SavedTensorMeter(self.weight_storages)
            cuda_peak = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                self.sync()
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
            with meter.hooks():
                self.call(sampler)
            if self.device.type == "cuda":
                self.sync()
                cuda_peak = (torch.cuda.max_memory_allocated(self.device) - base) / MIB
            self.check_gradients(label)
            runs = []
            for _ in range(repeats):
                self.sync()
                start = time.perf_counter()
                self.call(sampler)
                self.sync()
                runs.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            self.z.grad = self.e_x.grad = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"{label}: out of memory", file=sys.stderr, flush=True)
            return Result(steps, mode, ckpt, None, [], None, None)
        print(f"{label}: runs {', '.join(f'{r:.2f}' for r in runs)} s, saved {meter.peak / MIB:.1f} MiB",
              file=sys.stderr, flush=True)
        return Result(steps, mode, ckpt, statistics.median(runs), runs, meter.peak / MIB, cuda_peak)


def meta_estimate(stack: str, dtype: torch.dtype) -> list[str]:
    """Bytes autograd saves for one guided UNet step and one VAE decode (whole, and with decoder checkpointing:
    outer graph, then the largest block recomputed), counted on the meta device: no memory, no compute. An upper
    bound: shared storages are counted once per use, and attention takes the math path (saves its matrices)."""
    def saved(fn) -> float:
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total[0] / 2**30

    with torch.device("meta"):
        model = STACKS[stack]()
    model.to("meta", dtype)
    size, unet = model.unet.config.sample_size, model.unet
    x = torch.zeros(2, unet.config.in_channels, size, size, device="meta", dtype=unet.dtype, requires_grad=True)
    encoder = prompt_encoder(model)
    with torch.no_grad():
        cond = encoder.unconditional().to("meta", unet.dtype)
    hidden, pooled = (cond.hidden, cond.pooled) if hasattr(cond, "pooled") else (cond, None)
    sampler = DiffusionSampler(model, 1, GUIDANCE)
    step = saved(lambda: sampler._noise_prediction(x, torch.tensor(500, device="meta"), hidden.expand(2, -1, -1),
                                                   None if pooled is None else pooled.expand(2, -1)))
    vae = model.vae
    z = torch.zeros(1, vae.config.latent_channels, size, size, device="meta", dtype=vae.dtype, requires_grad=True)
    whole = saved(lambda: vae.decode(z))
    vae.enable_gradient_checkpointing(lambda module, *args: activation_checkpoint(module.__call__, *args,
                                                                                  use_reentrant=True))
    outer = saved(lambda: vae.decode(z))
    vae.disable_gradient_checkpointing()
    decoder, blocks = vae.decoder, []
    h = decoder.conv_in(vae.post_quant_conv(z)).detach().requires_grad_(True)
    for block in [decoder.mid_block, *decoder.up_blocks]:
        blocks.append(saved(lambda b=block, i=h: b(i)))
        h = block(h).detach().requires_grad_(True)
    return [f"{stack}, meta device, upper bounds: one guided UNet step (batch 2, {size}x{size} latents, {unet.dtype}): "
            f"{step:.2f} GiB saved", f"VAE decode ({vae.dtype}): {whole:.2f} GiB whole; with decoder checkpointing "
            f"{outer:.2f} GiB outer graph + {max(blocks):.2f} GiB for its largest block in backward"]


# ---------------------------------------------------------------------------------------- report
def table(results: list[Result], cuda: bool, plain: dict[int, float] | None = None) -> str:
    head = ["steps", "gradient mode", "checkpoint", "fwd+bwd s (median)", "time vs full", "saved MiB",
            "saved vs full"]
    if cuda:
        head += ["CUDA peak MiB"]
    if plain:
        head += ["plain call s", "iteration / plain call"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baseline = {r.steps: r for r in results if r.mode == "full" and not r.checkpoint}
    for r in results:
        ref = baseline.get(r.steps)
        oom = r.seconds is None
        ratio = "-" if oom or ref is None or ref.seconds is None else f"{r.seconds / ref.seconds:.2f}x"
        mem_ratio = "-" if oom or ref is None or not ref.saved_mib else f"{r.saved_mib / ref.saved_mib:.3f}x"
        row = [str(r.steps), MODE_LABELS[r.mode], "yes" if r.checkpoint else "no",
               "OOM" if oom else f"{r.seconds:.2f}", ratio, "OOM" if oom else f"{r.saved_mib:.1f}", mem_ratio]
        if cuda:
            row += ["OOM" if oom else f"{r.cuda_peak_mib:.0f}"]
        if plain:
            base = plain[r.steps]
            row += [f"{base:.2f}", "-" if oom else f"{r.seconds / base:.1f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", choices=sorted(STACKS), default="tiny")
    parser.add_argument("--steps", default="10,25,50", help="comma-separated step counts (default 10,25,50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration; the median is shown")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared, loaded CPU 2 threads ran 10x slower)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=1, help="latents per call (default 1)")
    parser.add_argument("--modes", default=",".join(MODES), help="subset of: " + ", ".join(MODES))
    parser.add_argument("--checkpoint", choices=["both", "no", "yes"], default="both")
    parser.add_argument("--construct-only", action="store_true",
                        help="build the stack on the meta device (shapes only, no memory), print its size, exit")
    parser.add_argument("--decoder-checkpoint", choices=["auto", "no", "yes"], default="auto",
                        help="checkpoint the VAE decoder with the UNet steps (auto: for sdxl, its default)")
    parser.add_argument("--plain", action="store_true", help="also time a plain pipeline call per step count")
    parser.add_argument("--meta-estimate", action="store_true",
                        help="count the bytes autograd saves for one step and one decode on the meta device, exit")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.repeats < 1 or not steps or min(steps) < 1:
        parser.error(f"bad --modes {unknown}, --repeats or --steps")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    dtype = getattr(torch, args.dtype)

    started = time.perf_counter()
    if args.meta_estimate:
        print("\n".join(meta_estimate(args.stack, dtype)))
        return 0
    if args.construct_only:
        with torch.device("meta"):
            print(describe(STACKS[args.stack]()))
        return 0
    model = STACKS[args.stack]()
    print(describe(model), f"(built in {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    if args.stack in ("sd15", "sdxl") and device.type == "cpu":
        print(f"warning: {args.stack} on a CPU takes 30 s or more per UNet forward+backward (see STACK_NOTES.md)",
              file=sys.stderr)
    if device.type != "cpu" or dtype != torch.float32:
        model.to(device, dtype)
    bench = Bench(model, device, dtype, args.batch)
    checkpoints = {"both": [False, True], "no": [False], "yes": [True]}[args.checkpoint]
    decoder = {"auto": args.stack == "sdxl", "no": False, "yes": True}[args.decoder_checkpoint]
    plain = {n: bench.plain(n, args.repeats) for n in steps} if args.plain else None
    results = [
        bench.measure(n, mode, ckpt, args.repeats, decoder) for n in steps for mode in modes for ckpt in checkpoints
    ]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(f"Command: `python {' '.join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:]))}`")
    print(f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; device {where};"
          f" {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; {args.dtype}; batch {args.batch};"
          f" guidance {GUIDANCE}; {type(model.scheduler).__name__}; decoder checkpoint {decoder};"
          f" median of {args.repeats}; total {time.perf_counter() - started:.0f} s")
    print(f"Stack: {describe(model)}")
    print()
    print(table(results, cuda=device.type == "cuda", plain=plain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
