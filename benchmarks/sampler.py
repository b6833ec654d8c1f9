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

Examples::

    python benchmarks/sampler.py                                   # tiny, 10,25,50 steps, 3 repeats
    python benchmarks/sampler.py --stack small --steps 10 --repeats 1
    python benchmarks/sampler.py --stack sd15 --device cuda --steps 10,25,50
    python benchmarks/sampler.py --stack sd15 --construct-only     # builds on CPU, runs nothing
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
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sage_lightning.loading import DiffusionModel, build_tiny, clip_tokenizer
from sage_lightning.sampler import DiffusionSampler, FullGradient, GradientMode, LastKGradient, ResidualGradient
from sage_lightning.text import PromptEncoder, slot

PROMPT = f"a photo of a {slot('x')}"
GUIDANCE = 7.5
MIB = 2**20


# ------------------------------------------------------------------------------------------ stacks
def _ddim() -> DDIMScheduler:
    """Stable Diffusion 1.x's scheduler settings (as ``build_tiny``)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
            intermediate_size=intermediate, num_attention_heads=heads, num_hidden_layers=layers,
            vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hidden,
        )
    )


def build_small(seed: int = 0) -> DiffusionModel:
    """A larger random stack: UNet (64, 128, 256) on 32x32x4 latents, VAE x8 -> 256 px images."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64, 128, 128], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, sample_size=256, norm_num_groups=32,
    )
    text_encoder = _clip_text(hidden=128, layers=4, heads=4, intermediate=512)
    return DiffusionModel(unet, vae, text_encoder, clip_tokenizer(), _ddim(), name="small").freeze()


def build_sd15(seed: int = 0) -> DiffusionModel:
    """Stable Diffusion 1.5's architecture with random weights (512 px, 64x64x4 latents)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # defaults = SD 1.x UNet
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2, sample_size=512, norm_num_groups=32,
    )
    text_encoder = _clip_text(hidden=768, layers=12, heads=12, intermediate=3072)
    return DiffusionModel(unet, vae, text_encoder, clip_tokenizer(), _ddim(), name="sd15").freeze()


STACKS: dict[str, Callable[[], DiffusionModel]] = {"tiny": build_tiny, "small": build_small, "sd15": build_sd15}


def image_size(model: DiffusionModel) -> int:
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return model.unet.config.sample_size * factor


def describe(model: DiffusionModel) -> str:
    count = {m: sum(p.numel() for p in getattr(model, m).parameters()) / 1e6 for m in ("unet", "vae", "text_encoder")}
    return (
        f"{model.name}: UNet {count['unet']:.2f}M, VAE {count['vae']:.2f}M, text encoder {count['text_encoder']:.2f}M"
        f" params; latents {model.unet.config.sample_size}x{model.unet.config.sample_size}"
        f"x{model.unet.config.in_channels}, images {image_size(model)} px"
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


MODES: dict[str, Callable[[bool], GradientMode]] = {
    "full": lambda ckpt: FullGradient(checkpoint=ckpt),
    "last_k": lambda ckpt: LastKGradient(k=5, checkpoint=ckpt),
    "residual": lambda ckpt: ResidualGradient(step=0.5, weight=1.0, checkpoint=ckpt),
}
MODE_LABELS = {"full": "full", "last_k": "last_k (k=5)", "residual": "residual (step 0.5, w=1)"}


class Bench:
    def __init__(self, model: DiffusionModel, device: torch.device, dtype: torch.dtype, batch: int) -> None:
        self.model, self.device, self.dtype, self.batch = model, device, dtype, batch
        self.encoder = PromptEncoder(model.tokenizer, model.text_encoder)
        with torch.no_grad():
            self.uncond = self.encoder([""])
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

    def measure(self, steps: int, mode: str, ckpt: bool, repeats: int) -> Result:
        sampler = DiffusionSampler(self.model, num_steps=steps, guidance_scale=GUIDANCE, grad_mode=MODES[mode](ckpt))
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


# ---------------------------------------------------------------------------------------- report
def table(results: list[Result], cuda: bool) -> str:
    head = ["steps", "gradient mode", "checkpoint", "fwd+bwd s (median)", "time vs full", "saved MiB",
            "saved vs full"]
    if cuda:
        head += ["CUDA peak MiB"]
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
    parser.add_argument("--construct-only", action="store_true", help="build the stack, print its size, exit")
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
    model = STACKS[args.stack]()
    print(describe(model), f"(built in {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    if args.construct_only:
        print(describe(model))
        return 0
    if args.stack == "sd15" and device.type == "cpu":
        print("warning: sd15 on a CPU takes about 30 s per UNet forward+backward (see STACK_NOTES.md)",
              file=sys.stderr)
    if device.type != "cpu" or dtype != torch.float32:
        model.to(device, dtype)
    bench = Bench(model, device, dtype, args.batch)
    checkpoints = {"both": [False, True], "no": [False], "yes": [True]}[args.checkpoint]
    results = [bench.measure(n, mode, ckpt, args.repeats) for n in steps for mode in modes for ckpt in checkpoints]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(f"Command: `python {' '.join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:]))}`")
    print(f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; device {where};"
          f" {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; {args.dtype}; batch {args.batch};"
          f" guidance {GUIDANCE}; DDIM; median of {args.repeats}; total {time.perf_counter() - started:.0f} s")
    print(f"Stack: {describe(model)}")
    print()
    print(table(results, cuda=device.type == "cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
