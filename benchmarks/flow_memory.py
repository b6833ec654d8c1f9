"""Benchmark: how much memory does a gradient through a flow transformer's whole sampling loop need? (issue 23 item 5)

Counted on the meta device (no memory, no compute, seconds on a CPU): the bytes autograd saves for one
transformer call of Stable Diffusion 3 medium and FLUX.1 dev (their published configs, random weights never
materialised), for each of its blocks, and for one VAE decode (whole, and with the decoder checkpointed: its
outer graph plus its largest block recomputed). Attention is counted as a fused kernel saves it (q, k, v, the
output and one log-sum-exp per query row: ``FusedAttentionAccounting``), not as the math path's score matrices,
which a GPU run never keeps. The gradient modes of :mod:`sage_lightning.sampler` then combine these over
``--steps`` sampling steps as :class:`~sage_lightning.flow_sampler.FlowSampler` runs them (METHOD.md, "Gradient
modes"): each graphed step (``mode.graphed_steps``) keeps its whole graph, or with ``checkpoint`` (per block, as the
sampler checkpoints) every block's input and the graph outside the blocks, plus one block's graph recomputed in
backward; the steps before the graph keep nothing. Rows: full without checkpointing, and full, last_k (k=5) and
residual (step 0.5: the last half of the steps graphed) with the transformer's blocks and the VAE decoder
checkpointed, as configs/models/sd3.yaml and flux.yaml run them.

Each adds the VAE decode (checkpointed where the mode checkpoints). Text encoders hold no graph (the prompt is
fixed). FLUX is counted with its embedded guidance (one call a step); true CFG doubles its transformer part.
Upper bounds up to storages shared between saved tensors, which are counted once per use.
    python benchmarks/flow_memory.py --sizes 512,1024 --steps 28

``--measure`` runs each mode instead, on random weights (benchmarks/flow_measure.py; a GPU for the full-size
stacks, ``--models tiny-sd3,tiny-flux --device cpu`` for the tiny ones) and prints seconds, peak GPU memory and
iteration / plain pipeline call:

    python benchmarks/flow_memory.py --measure --models sd3-medium,flux-dev --sizes 512,1024 --device cuda
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

from sage_lightning.sampler import FullGradient, GradientMode, LastKGradient, ResidualGradient

GIB = 2**30
LAST_K = 5

# Published configs (transformer/config.json, vae/config.json of the hub folders), architecture keys only.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention that saves what a fused kernel saves: q, k, v, the output and one
    log-sum-exp per query row (the score matrix is recomputed in backward, never stored)."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):  # noqa: ANN001 (autograd.Function signature)
        with torch.no_grad():
            out = _SDPA(q, k, v, **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        raise RuntimeError("FusedAttentionAccounting only counts saved tensors; it does not differentiate")


_SDPA = F.scaled_dot_product_attention


@contextmanager
def fused_attention_accounting():
    """Within: ``F.scaled_dot_product_attention`` saves as a fused kernel does (diffusers' attention processors
    look it up at call time)."""
    def sdpa(query, key, value, **kwargs):  # noqa: ANN001, ANN202 (torch's own signature and names)
        return _FusedAttention.apply(query, key, value, kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


class SavedBytes:
    """Bytes of the tensors autograd saves while active, in total and per named region (``region``)."""

    def __init__(self) -> None:
        self.total = 0
        self.current: str | None = None
        self.regions: dict[str, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        self.total += size
        if self.current is not None:
            self.regions[self.current] = self.regions.get(self.current, 0) + size
        return tensor

    @contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t), fused_attention_accounting():
            yield self

    def attribute_to(self, modules: dict[str, torch.nn.Module]) -> None:
        """Count the bytes saved inside each of ``modules`` under its name (e.g. each transformer block)."""
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda _m, _a, n=name: setattr(self, "current", n))
            module.register_forward_hook(lambda _m, _a, _o: setattr(self, "current", None))


def _meta(shape: tuple[int, ...], dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.zeros(shape, device="meta", dtype=dtype, requires_grad=grad)


def sd3_call(size: int, dtype: torch.dtype) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """SD3 medium, one guided call (negative and positive batched: batch 2; CLIP 77 + T5 256 tokens)."""
    model = SD3Transformer2DModel(**SD3_MEDIUM).to(dtype)
    latent = _meta((2, 16, size // 8, size // 8), dtype, grad=True)

    def call() -> torch.Tensor:
        return model(hidden_states=latent, encoder_hidden_states=_meta((2, 77 + 256, 4096), dtype),
                     pooled_projections=_meta((2, 2048), dtype), timestep=_meta((2,), dtype)).sample
    return model, call


def flux_call(size: int, dtype: torch.dtype) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """FLUX.1 dev, one call (distilled guidance embedding: batch 1; T5 512 tokens; 2x2-packed latents)."""
    model = FluxTransformer2DModel(**FLUX_DEV).to(dtype)
    tokens = (size // 16) ** 2
    latent = _meta((1, tokens, 64), dtype, grad=True)

    def call() -> torch.Tensor:
        return model(hidden_states=latent, encoder_hidden_states=_meta((1, 512, 4096), dtype),
                     pooled_projections=_meta((1, 768), dtype), timestep=_meta((1,), dtype),
                     img_ids=_meta((tokens, 3), dtype), txt_ids=_meta((512, 3), dtype),
                     guidance=_meta((1,), dtype)).sample
    return model, call


MODELS = {"sd3-medium": sd3_call, "flux-dev": flux_call}
BLOCKS = {"checkpoint": True, "decoder_checkpoint": True}
MODES: dict[str, GradientMode] = {  # the sampler's own gradient modes, labelled for the table
    "full, nothing checkpointed": FullGradient(),
    "full, per-block checkpointing": FullGradient(**BLOCKS),
    f"last_k (k={LAST_K}), per-block checkpointing": LastKGradient(LAST_K, **BLOCKS),
    "residual (step 0.5), per-block checkpointing": ResidualGradient(0.5, 1.0, **BLOCKS),
}


def transformer_bytes(name: str, size: int, dtype: torch.dtype) -> dict[str, float]:
    """Saved bytes of one call: ``step`` (all), ``block`` (the largest block), ``boundaries`` (every block's
    input and the graph outside the blocks: what per-block checkpointing keeps)."""
    with torch.device("meta"):
        model, call = MODELS[name](size, dtype)
    blocks = {f"{kind}{i}": b for kind in ("transformer_blocks", "single_transformer_blocks")
              for i, b in enumerate(getattr(model, kind, []))}
    inputs: dict[str, int] = {}
    for key, block in blocks.items():
        block.register_forward_pre_hook(
            lambda _m, args, kwargs, k=key: inputs.__setitem__(k, sum(
                t.numel() * t.element_size() for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))),
            with_kwargs=True)
    meter = SavedBytes()
    meter.attribute_to(blocks)
    with meter.counting():
        call()
    outside = meter.total - sum(meter.regions.values())  # embeddings, final norm and projection
    return {"step": meter.total, "block": max(meter.regions.values()), "boundaries": sum(inputs.values()) + outside}


def decoder_bytes(size: int, dtype: torch.dtype) -> dict[str, float]:
    """Saved bytes of one VAE decode: ``whole``, and ``checkpointed`` (outer graph + its largest block)."""
    with torch.device("meta"):
        vae = AutoencoderKL(**FLOW_VAE, sample_size=size).to(dtype)
    z = _meta((1, 16, size // 8, size // 8), dtype, grad=True)
    whole = SavedBytes()
    with whole.counting():
        vae.decode(z)
    decoder = vae.decoder
    blocks = {"mid": decoder.mid_block, **{f"up{i}": b for i, b in enumerate(decoder.up_blocks)}}
    inner = SavedBytes()
    inner.attribute_to(blocks)
    with inner.counting():
        vae.decode(z)
    outer = inner.total - sum(inner.regions.values())
    return {"whole": whole.total, "checkpointed": outer + max(inner.regions.values())}


def saved_peak(mode: GradientMode, steps: int, t: dict[str, float], d: dict[str, float]) -> float:
    """Saved-tensor peak of one iteration in ``mode`` (``t``: :func:`transformer_bytes`, ``d``:
    :func:`decoder_bytes`)."""
    graphed = mode.graphed_steps(steps)
    transformer = graphed * t["boundaries"] + t["block"] if mode.checkpoint else graphed * t["step"]
    return transformer + (d["checkpointed"] if mode.decoder_checkpoint else d["whole"])


def mode_table(name: str, size: int, steps: int, dtype: torch.dtype) -> list[str]:
    """Rows ``| model | px | mode | GiB |`` of the saved-tensor peak of each gradient mode (:data:`MODES`)."""
    t, d = transformer_bytes(name, size, dtype), decoder_bytes(size, dtype)
    return [f"| {name} | {size} | {label} | {saved_peak(mode, steps, t, d) / GIB:,.2f} |"
            for label, mode in MODES.items()]


def measured_rows(name: str, size: int, args: argparse.Namespace) -> list[str]:
    """``--measure``: time and peak memory of each mode on ``name``'s stack, random weights (flow_measure.py)."""
    from flow_measure import GUIDANCE, build_stack, measure, measured_table

    model = build_stack(name, getattr(torch, args.dtype), args.device)
    rows = measure(model, MODES, size, args.steps, GUIDANCE[name], args.true_cfg, args.repeats)
    return measured_table(name, size, rows)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="with --measure also tiny-sd3, tiny-flux")
    parser.add_argument("--sizes", default="512,1024", help="image sides in px")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--measure", action="store_true", help="run each mode on random weights (flow_measure.py)")
    parser.add_argument("--device", default="cuda", help="--measure: where the stacks run")
    parser.add_argument("--repeats", type=int, default=1, help="--measure: runs per mode, the best one counts")
    parser.add_argument("--true-cfg", type=float, default=1.0, help="--measure: FLUX's true CFG scale")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    known = (*MODELS, "tiny-sd3", "tiny-flux") if args.measure else tuple(MODELS)
    if args.measure:
        rows = ["| model | px | gradient mode | s per iteration | peak GPU memory, GiB | iteration / plain call |",
                "|---|---|---|---|---|---|"]
    else:
        rows = ["| model | px | gradient mode | saved tensors, GiB |", "|---|---|---|---|"]
    for name in args.models.split(","):
        if name not in known:
            parser.error(f"--models: unknown {name!r}; use {', '.join(known)}")
        for size in (int(s) for s in args.sizes.split(",")):
            if size % 16 or size <= 0:
                parser.error(f"--sizes: {size} px is not a positive multiple of 16")
            rows += measured_rows(name, size, args) if args.measure else mode_table(name, size, args.steps, dtype)
    what = ("Measured on random weights (peak: all allocated GPU memory, weights included)" if args.measure else
            "Saved-tensor peak on the meta device (weights and the optimiser's state come on top)")
    print(f"\n{what}: one search iteration, {args.steps} steps, {args.dtype}:\n")
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
