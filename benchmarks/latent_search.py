"""Lightning overhead of LatentSearch versus a plain PyTorch loop doing the same math, and batch throughput.

    python benchmarks/latent_search.py --stack tiny --iterations 12 --repeats 3 [--scheduler euler-a]

Both sides: the same frozen models, targets, sampler, discriminator and sign-gradient step with clamping.
The Lightning side is the real `trainer.fit` (run-folder writer, per-pass checkpoint, progress bar off),
timed from the first to the last training batch; no target may finish early (tau is set to ~0), so both
do exactly ``iterations x targets`` attack iterations. A scheduler that draws noise (euler-a, DDIM with
``--eta`` > 0) draws it on both sides from each target's own generator, as the searches do, so both sides
compute the same images. Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch

from sage_lightning.callbacks import ClampPerturbation, FailureWriter, IterationCheckpoint
from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.models import default_ensemble
from sage_lightning.searches import LatentSearch
from sage_lightning.targets import noise_generator


class BatchClock(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "start"):
            self.start = time.perf_counter()
        self.steps = getattr(self, "steps", 0) + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def never_failing_ensemble(stack: str):
    ensemble = default_ensemble(stack)
    ensemble.tau = 1e-12  # no target finishes: both sides run the full budget
    return ensemble


def make_search(args, iterations: int) -> tuple[LatentSearch, ClassPromptDataModule]:
    search = LatentSearch(
        diffusion=args.stack, ensemble=never_failing_ensemble(args.stack), num_steps=args.steps,
        guidance_scale=3.0, max_iterations=iterations, scheduler=args.scheduler, eta=args.eta,
    )
    classes = ["star", "ring", "heart", "cross", "arrow", "square", "circle", "hexagon"]
    data = ClassPromptDataModule(classes=classes[: args.targets], batch_size=args.batch)
    return search, data


def lightning_seconds_per_iteration(args) -> float:
    search, data = make_search(args, args.iterations)
    clock = BatchClock()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            default_root_dir=root, max_epochs=args.iterations, accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[ClampPerturbation(), FailureWriter(), IterationCheckpoint(f"{root}/checkpoints"), clock],
        )
        trainer.fit(search, datamodule=data)
    # from the first batch's start to the last batch's end, per attack iteration of one target
    return (clock.end - clock.start) / (args.iterations * len(search.targets))


def plain_images(sampler, targets, latents, cond, uncond, ids):
    """The images of the targets ``ids``, without Lightning: each row's scheduler noise (if any) from a fresh
    generator of its target's seed (``targets.noise_generator``), as ``TargetSearch.generate`` draws it."""
    generators = [noise_generator(targets[int(i)].seed, tuple(latents.shape[1:])) for i in ids]
    return sampler(latents, cond, uncond, generators)


def plain_seconds_per_iteration(args) -> float:
    search, data = make_search(args, args.iterations)
    search.prepare(data.targets)  # loads the same models; no trainer involved below
    model_ids = torch.arange(len(search.targets))
    delta = torch.zeros(len(search.targets), *search.latent_shape(), requires_grad=True)
    z0_all = search.initial_latents(model_ids)
    prompts = [t.prompt for t in search.targets]
    classes = search.class_index
    sampler, ensemble, encoder = search.sampler, search.frozen.ensemble, search.frozen.encoder
    with torch.no_grad():
        cond_all, uncond = encoder(prompts), encoder([""])
    start = time.perf_counter()
    for _ in range(args.iterations):
        for lo in range(0, len(prompts), args.batch):
            ids = model_ids[lo : lo + args.batch]
            images = plain_images(sampler, search.targets, z0_all[ids] + delta[ids], cond_all[ids], uncond, ids)
            out = ensemble(images, classes[ids])
            out.per_sample_loss.sum().backward()
            with torch.no_grad():
                delta.sub_(0.05 * delta.grad.sign()).clamp_(-1, 1)
            delta.grad = None
    return (time.perf_counter() - start) / (args.iterations * len(prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="tiny", choices=["tiny", "shapesworld"])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--scheduler", default="ddim", help="ddim, euler, euler-a, dpm++, dpm++-sde, pndm")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (> 0 draws noise at every step)")
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch in (1, 8):
        args.batch = batch
        plain, light = [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both sides alike
            plain.append(plain_seconds_per_iteration(args))
            light.append(lightning_seconds_per_iteration(args))
        rows.append((batch, statistics.median(plain), statistics.median(light)))
    print(f"\nstack={args.stack} steps={args.steps} scheduler={args.scheduler} eta={args.eta} targets={args.targets} "
          f"iterations={args.iterations} "
          f"repeats={args.repeats} threads={args.threads}\n")
    print("| targets per step | plain loop s / target-iteration | LatentSearch (Lightning) s / target-iteration "
          "| Lightning overhead | throughput vs batch 1 (Lightning) |")
    print("|---|---|---|---|---|")
    base = rows[0][2]
    for batch, plain, light in rows:
        print(f"| {batch} | {plain:.4f} | {light:.4f} | {100 * (light / plain - 1):+.1f}% | {base / light:.2f}x |")


if __name__ == "__main__":
    main()
