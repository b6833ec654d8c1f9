"""benchmarks/flow_memory.py: the meta-device accounting counts what autograd would keep."""

from __future__ import annotations

import importlib.util
import sys

import torch
import torch.nn.functional as F
from helpers import REPO

from sage_lightning.sampler import FullGradient, LastKGradient, ResidualGradient

spec = importlib.util.spec_from_file_location("flow_memory", REPO / "benchmarks" / "flow_memory.py")
flow_memory = importlib.util.module_from_spec(spec)
sys.modules["flow_memory"] = flow_memory
spec.loader.exec_module(flow_memory)

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
