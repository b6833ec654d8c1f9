"""Steps, boxes, starting points and losses of the embedding searches in the text encoder's own units (issue 20):
computed from the tables of the tiny SD and SDXL stacks, the random starts never a class name, the losses."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sage_lightning.callbacks import TokenWriter
from sage_lightning.candidates import WordListCandidates
from sage_lightning.datamodules import ClassPromptDataModule, PromptSetDataModule
from sage_lightning.embedding import excluded_token_ids, initial_embedding, member_loss, table_scale
from sage_lightning.errors import SageError
from sage_lightning.models import build_tiny, build_tiny_xl
from sage_lightning.optim import SignSGD
from sage_lightning.searches import PromptSearch, UniversalTokenSearch
from sage_lightning.shapesworld.generator import SHAPES
from sage_lightning.text import prompt_encoder


def _table(encoder) -> torch.Tensor:
    return encoder.token_embedding.weight


# ------------------------------------------------------------------------------- scale from the table
def test_step_and_box_of_the_tiny_sd_stack_follow_its_table():
    encoder = prompt_encoder(build_tiny())
    table = _table(encoder).detach().float()
    scale = table_scale(encoder)
    assert torch.allclose(scale.step_scale("table"), torch.full((32,), float(table.std())))
    assert scale.step_scale("absolute") is None  # the paper's constants: lr alone
    assert torch.equal(scale.low, table.min(0).values) and torch.equal(scale.high, table.max(0).values)
    assert scale.max_norms == pytest.approx((float(table.norm(dim=1).max()),))
    with torch.no_grad():
        _table(encoder).mul_(10.0)  # another encoder, ten times the size: the step and the box follow
    bigger = table_scale(encoder)
    assert torch.allclose(bigger.step_scale("table"), 10 * scale.step_scale("table"))
    assert torch.allclose(bigger.high, 10 * scale.high) and torch.allclose(bigger.low, 10 * scale.low)
    assert bigger.max_norms[0] == pytest.approx(10 * scale.max_norms[0], rel=1e-5)


def test_each_sdxl_table_decides_its_own_share_of_the_slot_vector():
    encoder = prompt_encoder(build_tiny_xl())
    first, second = (part.token_embedding.weight for part in encoder.parts)
    scale = table_scale(encoder)
    assert scale.widths == (32, 32) and len(scale.step_scale("table")) == 64
    with torch.no_grad():
        second.mul_(4.0)  # only the second encoder's table grows
    after = table_scale(encoder)
    step, step_after = scale.step_scale("table"), after.step_scale("table")
    assert torch.allclose(step_after[:32], step[:32]) and torch.allclose(step_after[32:], 4 * step[32:])
    assert torch.equal(after.high[:32], scale.high[:32]) and torch.allclose(after.high[32:], 4 * scale.high[32:])
    assert after.max_norms[0] == pytest.approx(scale.max_norms[0])
    assert after.max_norms[1] == pytest.approx(4 * scale.max_norms[1], rel=1e-5)
    assert step_after[0] == pytest.approx(float(first.detach().std()))


def test_sign_step_moves_each_entry_by_lr_times_its_scale():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.tensor([[1.0, -2.0, 0.0], [-0.1, 3.0, 4.0]])
    SignSGD([p], lr=0.5, scale=torch.tensor([0.02, 0.1, 1.0])).step()
    assert torch.allclose(p.detach(), torch.tensor([[-0.01, 0.05, 0.0], [0.01, -0.05, -0.5]]))
    with pytest.raises(SageError, match="scale must be finite and > 0"):
        SignSGD([p], lr=0.5, scale=torch.tensor([0.0, 1.0, 1.0]))


def test_range_and_norm_boxes():
    scale = table_scale(prompt_encoder(build_tiny_xl()))
    far = torch.full((3, 64), 5.0)
    assert torch.equal(scale.project(far, "range"), scale.high.expand(3, -1))
    assert torch.equal(scale.project(-far, "range"), scale.low.expand(3, -1))
    ball = scale.project(far, "norm")
    assert ball[:, :32].norm(dim=1).tolist() == pytest.approx([scale.max_norms[0]] * 3)
    assert ball[:, 32:].norm(dim=1).tolist() == pytest.approx([scale.max_norms[1]] * 3)
    inside = 0.001 * torch.ones(64)
    assert torch.equal(scale.project(inside, "norm"), inside) and torch.equal(scale.project(far, "none"), far)


# ------------------------------------------------------------------------------------ starting points
def test_random_row_is_a_row_of_the_table_and_never_an_excluded_word():
    encoder = prompt_encoder(build_tiny())
    tokenizer = encoder.tokenizer
    the, star = encoder.word_ids("the")[0], encoder.word_ids("star")[0]
    excluded = excluded_token_ids(tokenizer, ["star"])
    assert star in excluded and encoder.word_ids("stars")[0] in excluded and tokenizer.eos_token_id in excluded
    assert the not in excluded
    only = set(range(_table(encoder).shape[0])) - {the, star}  # left: "the", and "star", which is excluded
    for seed in range(10):
        start = initial_embedding(encoder, "random_row", torch.Generator().manual_seed(seed), only | excluded)
        assert torch.equal(start, _table(encoder)[the].detach())
    a, b = (initial_embedding(encoder, "random_row", torch.Generator().manual_seed(s), excluded) for s in (0, 1))
    assert not torch.equal(a, b)


def test_mean_noise_follows_the_tables_mean_and_spread():
    encoder = prompt_encoder(build_tiny())
    scale = table_scale(encoder)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([initial_embedding(encoder, "mean_noise", generator, scale=scale) for _ in range(4000)])
    assert torch.allclose(draws.mean(0), scale.mean_row, atol=4 * float(scale.dim_std.max()) / 4000**0.5)
    assert torch.allclose(draws.std(0), scale.dim_std, rtol=0.1)


def test_searches_start_in_the_tables_distribution_never_at_a_shape_name():
    data = PromptSetDataModule(classes=["ring", "heart"], seeds_per_class=1, held_out_templates=["a drawing of a {}"])
    token = UniversalTokenSearch(target="star", diffusion="tiny", num_steps=2, max_iterations=1)
    token.prepare(data.targets, data.held_out)
    encoder = token.frozen.encoder
    shape_ids = {i for s in SHAPES for form in (s, s + "s") for i in encoder.word_ids(form)}
    assert shape_ids <= token.excluded_ids([])  # every shape name and plural, the target's among them
    assert token.init == "mean_noise" and not torch.equal(token.token.detach(), torch.zeros(32))
    again = UniversalTokenSearch(target="star", diffusion="tiny", num_steps=2, max_iterations=1)
    again.prepare(data.targets, data.held_out)
    assert torch.equal(again.token.detach(), token.token.detach())  # seeded: the same start
    search = PromptSearch(candidates=WordListCandidates(["red"]), diffusion="tiny", num_steps=2, eval_seeds=1)
    search.prepare(ClassPromptDataModule(classes=["star", "ring"]).targets)
    table = _table(search.frozen.encoder).detach()
    allowed = [i for i in range(table.shape[0]) if i not in search.excluded_ids(["star"])]
    for t in range(2):
        starts = search.slots[t].detach()
        matches = [(table[allowed] == row).all(1).nonzero().flatten().tolist() for row in starts]
        assert all(len(m) == 1 for m in matches)  # each slot is exactly one allowed row
    assert not torch.equal(search.slots[0, 0], search.slots[0, 1])


def test_init_word_needs_init_word_rule():
    with pytest.raises(SageError, match="only used with init: word"):
        UniversalTokenSearch(target="star", diffusion="tiny", init="random_row", init_word="the")
    token = UniversalTokenSearch(target="star", diffusion="tiny", init_word="the")
    assert token.init == "word"


# ------------------------------------------------------------------------------------------- losses
def test_loss_options_equal_their_formulas_and_do_not_saturate():
    logits = torch.tensor([[[4.0, 1.0, 0.0], [0.0, 2.0, 1.0]], [[6.0, 0.0, 0.5], [1.0, 1.0, 3.0]]])  # [M=2, B=2, C=3]
    probs = logits.softmax(-1)
    cls = torch.tensor([1, 2])
    p = probs[:, [0, 1], [1, 2]]
    assert torch.allclose(member_loss(probs, cls, "paper", towards=True), (1 - 2 * p).mean(0))
    assert torch.allclose(member_loss(probs, cls, "paper", towards=False), (2 * p - 1).mean(0))
    assert torch.allclose(member_loss(probs, cls, "log", towards=True), -(p + 1e-6).log().mean(0), atol=1e-6)
    assert torch.allclose(member_loss(probs, cls, "log", towards=False), -(1 - p + 1e-6).log().mean(0), atol=1e-6)
    own = logits[:, [0, 1], [1, 2]]
    other = torch.stack([logits[:, 0, [0, 2]].max(-1).values, logits[:, 1, [0, 1]].max(-1).values], 1)
    assert torch.allclose(member_loss(probs, cls, "margin", towards=True), (other - own).mean(0), atol=1e-2)
    assert torch.allclose(member_loss(probs, cls, "margin", towards=False), (own - other).mean(0), atol=1e-2)

    def slope(kind: str, target: int, towards: bool) -> float:  # |d loss / d logits| of one sample
        z = torch.tensor([[[9.0, 0.0, 0.0]]], requires_grad=True)
        member_loss(z.softmax(-1), torch.tensor([target]), kind, towards).sum().backward()
        return float(z.grad.abs().sum())

    # towards a class the members give p ~ 1e-4 (universal token), away from one they give p ~ 1 (prompt search)
    for towards, target in ((True, 1), (False, 0)):
        assert slope("log", target, towards) > 100 * slope("paper", target, towards)
        assert slope("margin", target, towards) > 100 * slope("paper", target, towards)


def test_the_search_trains_on_the_chosen_loss_and_projects_after_each_step(tmp_path):
    data = PromptSetDataModule(classes=["ring", "heart"], seeds_per_class=1, batch_size=2,
                               held_out_templates=["a drawing of a {}"])
    search = UniversalTokenSearch(target="star", diffusion="tiny", num_steps=2, max_iterations=1, loss="log", lr=0.5)
    search.prepare(data.targets, data.held_out)
    images = search.render(search.targets, with_token=True)
    output = search.surrogate(images, search.target_index.expand(2), towards=True)
    probs = search.frozen.ensemble.member_probs(images)
    assert torch.allclose(output.per_sample_loss, member_loss(probs, search.target_index.expand(2), "log", True))
    with torch.no_grad():
        search.token.copy_(search.scale.high - 1e-4)  # at the box's edge: a step out is projected back
    start = search.token.detach().clone()
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[TokenWriter(judge=None)])
    trainer.fit(search, datamodule=data)
    token, scale = search.token.detach(), search.scale
    assert bool((token <= scale.high).all() and (token >= scale.low).all())
    moved = (token - start).abs()
    assert bool((moved <= 0.5 * scale.step_scale("table") + 1e-6).all()) and moved.max() > 0
