"""benchmarks/flow_memory.py: the meta-device accounting counts what autograd would keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, load_benchmark

from sage_lightning.flow_sampler import FlowSampler
from sage_lightning.sampler import FullGradient, LastKGradient, ResidualGradient

flow_memory = load_benchmark("flow_memory.py", "flow_memory")

TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=4096, caption_projection_dim=16, pooled_projection_dim=2048, out_channels=16,
                pos_embed_max_size=16)


def test_fused_attention_saves_inputs_output_and_row_statistics_only():
    q, k, v = (torch.zeros(1, 2, 16, 8, device="meta", requires_grad=True) for _ in range(3))
    meter = flow_memory.SavedBytes()
    with meter.counting():
        F.scaled_dot_product_attention(q, k, v)
    assert meter.total == 4 * (1 * 2 * 16 * 8 * 4) + 1 * 2 * 16 * 4  # q, k, v, out (fp32) + log-sum-exp
    assert F.scaled_dot_product_attention is flow_memory._SDPA  # restored on exit


def test_modes_order_and_block_attribution(monkeypatch):
    monkeypatch.setattr(flow_memory, "SD3_MEDIUM", TINY_SD3)
    t = flow_memory.transformer_bytes("sd3-medium", 64, torch.float32)
    assert 0 < t["block"] < t["step"] and 2 * 16 * 8 * 8 * 4 < t["boundaries"] < 2 * t["step"]
    rows = flow_memory.mode_table("sd3-medium", 64, 28, torch.float32)
    gib = {r.split(" | ")[2]: float(r.split(" | ")[3].rstrip(" |").replace(",", "")) for r in rows}
    assert gib["full, nothing checkpointed"] > gib["full, per-block checkpointing"]
    assert gib["full, per-block checkpointing"] > gib["residual (step 0.5), per-block checkpointing"]
    assert gib["residual (step 0.5), per-block checkpointing"] > gib["last_k (k=5), per-block checkpointing"]


def test_the_peak_follows_the_samplers_graphed_steps_and_checkpointing():
    """What a mode keeps is what the sampler graphs: ``graphed_steps`` steps, each whole or (per-block
    checkpointing) its block inputs plus one block recomputed; the decoder whole or checkpointed."""
    t, d = {"step": 100.0, "block": 7.0, "boundaries": 20.0}, {"whole": 50.0, "checkpointed": 5.0}
    peak = flow_memory.saved_peak
    assert peak(FullGradient(), 28, t, d) == 28 * 100 + 50
    assert peak(ResidualGradient(0.5, checkpoint=True, decoder_checkpoint=True), 28, t, d) == 14 * 20 + 7 + 5
    assert peak(LastKGradient(5, checkpoint=True), 28, t, d) == 5 * 20 + 7 + 50


@pytest.fixture
def flow_measure(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when the script runs from its folder
    import flow_measure

    return flow_measure


def test_measure_mode_times_every_mode_and_the_plain_call_on_the_tiny_stacks(flow_measure):
    rows = flow_memory.main(["--measure", "--models", "tiny-sd3,tiny-flux", "--sizes", "32", "--steps", "2",
                             "--device", "cpu", "--dtype", "float32"])
    cells = [r.strip("| ").split(" | ") for r in rows[2:]]
    assert [c[2] for c in cells] == [*flow_memory.MODES, "plain pipeline call"] * 2
    assert [c[0] for c in cells] == ["tiny-sd3"] * 5 + ["tiny-flux"] * 5
    assert all(float(c[3]) > 0 and c[4] == "-" for c in cells) and cells[4][5] == cells[9][5] == "1.00"


@pytest.mark.parametrize("name, true_cfg", [("tiny-sd3", 1.0), ("tiny-flux", 1.0), ("tiny-flux", 2.0)])
def test_the_plain_call_is_the_pipeline_on_what_the_iteration_samples(flow_measure, name, true_cfg):
    """The baseline is diffusers' pipeline on the same latents and embeddings: the sampler's image."""
    model = flow_measure.build_stack(name, torch.float32, "cpu")
    cond, uncond = flow_measure.embeddings(model, 0), flow_measure.embeddings(model, 1)
    z = torch.randn(1, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    guidance = flow_measure.GUIDANCE[name]
    plain = flow_measure.plain_call(model, z, cond, uncond, 32, 2, guidance, true_cfg)
    with torch.no_grad():
        ours = FlowSampler(model, 2, guidance, true_cfg_scale=true_cfg)(z, cond, uncond)
    assert (plain - ours).abs().max() < 1e-4


def test_the_full_size_stacks_are_the_published_architectures_built_in_the_dtype(flow_measure):
    """Built on the meta device here (a GPU run builds them on the GPU): never materialised in float32."""
    sizes = {}
    for name in ("sd3-medium", "flux-dev"):
        model = flow_measure.build_stack(name, torch.bfloat16, "meta")
        dtypes = {p.dtype for m in (model.transformer, model.vae) for p in m.parameters()}
        assert dtypes == {torch.bfloat16} and model.latent_shape(1024, 1024) == (16, 128, 128)
        sizes[name] = round(sum(p.numel() for p in model.transformer.parameters()) / 1e9, 2)
    assert sizes == {"sd3-medium": 2.03, "flux-dev": 11.9}
