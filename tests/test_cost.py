"""One cost model (issue 22 item 2): the cost every search records, pinned to numbers worked out by hand.

Units (sage_lightning/cost.py): forward-equivalents (FE) count a UNet forward as 1, a backward as 2 and a
checkpointed recompute as 1 more; UNet evaluations (UE) count a backward as 1 call and a recompute as 1 more.
An image is ``loop_length`` steps x 2 branches with guidance (guidance_scale 3.0, the default), x 1 without.
Nothing here loads model weights: the costs read the sampling settings and the scheduler's config only.
"""

from __future__ import annotations

import pytest
import torch

from sage_lightning.candidates import WordListCandidates
from sage_lightning.cost import UNET_EVALUATIONS, SamplingCost
from sage_lightning.sampler import FullGradient, LastKGradient, ResidualGradient
from sage_lightning.searches import LatentSearch, PromptSearch, RandomLatentSearch, RandomWordSearch

WORDS = WordListCandidates(["red", "blue", "green"])


@pytest.mark.parametrize(
    ("settings", "iterations", "fe", "ue"),
    [
        # full gradient, guided, 4 steps: an image 4 x 2 = 8; a backward 4 x 2 graphed calls, 2 FE or 1 UE each
        # FE = (3 + 1) x 8 + 3 x 16 = 80; UE = (3 + 1) x 8 + 3 x 8 = 56
        ({"num_steps": 4, "grad_mode": FullGradient()}, 3, 80, 56),
        # last 2 of 4 steps, checkpointed, unguided: an image 4; a backward 2 calls, (2 + 1) FE or (1 + 1) UE each
        # FE = 4 x 4 + 3 x 6 = 34; UE = 4 x 4 + 3 x 4 = 28
        ({"num_steps": 4, "guidance_scale": 1.0, "grad_mode": LastKGradient(k=2, checkpoint=True)}, 3, 34, 28),
        # SAGE's residual at 0.5 of 5 steps: the graph starts at floor(2.5) = 2, so 3 steps x 2 branches
        # an image 5 x 2 = 10; FE = 3 x 10 + 2 x (6 x 2) = 54; UE = 3 x 10 + 2 x 6 = 42
        ({"num_steps": 5, "grad_mode": ResidualGradient(0.5)}, 2, 54, 42),
        # no update at all: the first evaluation alone, 8 forwards in both units
        ({"num_steps": 4, "grad_mode": FullGradient()}, 0, 8, 8),
    ],
)
def test_latent_search_records_the_hand_computed_cost(settings, iterations, fe, ue):
    search = LatentSearch(diffusion="tiny", **settings)
    assert search.forward_equivalents(iterations) == fe
    assert search.unet_evaluations(iterations) == ue


def test_random_latent_draws_are_forwards_only_and_fill_the_sage_budget():
    # 4 guided steps: a draw costs 8 in both units; 3 extra draws and the first: 4 x 8 = 32
    search = RandomLatentSearch(diffusion="tiny", num_steps=4)
    assert search.forward_equivalents(3) == search.unet_evaluations(3) == 32
    # SAGE's 3 iterations with the default residual (0.5 of 4 steps: 2 graphed steps x 2 branches x 2 FE = 8):
    # 4 x 8 + 3 x 8 = 56 FE; draws after the first that fit: 56 // 8 - 1 = 6
    matched = RandomLatentSearch(diffusion="tiny", num_steps=4, match_sage_iterations=3)
    assert matched.max_iterations == 6


def test_prompt_search_and_its_baseline_record_the_hand_computed_cost():
    # 2 guided steps: an image 4; the default exact, checkpointed backward: 2 steps x 2 branches, 3 FE or 2 UE
    # a sign step: 4 + 4 x 3 = 16 FE, 4 + 4 x 2 = 12 UE
    search = PromptSearch(candidates=WORDS, diffusion="tiny", num_steps=2, eval_seeds=3, max_words=4)
    search.iterations, search.spent = torch.tensor([7]), torch.tensor([24])  # 24: two prompts of S=3 images
    assert search.target_forward_equivalents(0) == 7 * 16 + 24 == 136
    assert search.target_unet_evaluations(0) == 7 * 12 + 24 == 108
    assert search.forward_equivalents_spent() == 136
    # the baseline's budget: L=4 words of K=5 steps and one evaluation each: 4 x (5 x 16 + 3 x 4) = 368 FE;
    # a round is one evaluation of 3 x 4 = 12 forwards: 368 // 12 = 30 rounds
    baseline = RandomWordSearch(candidates=WORDS, diffusion="tiny", num_steps=2, eval_seeds=3, max_words=4,
                                match_sage_steps_per_word=5)
    assert baseline.word_rounds == 30 and baseline.eval_cost() == 12
    baseline.iterations, baseline.spent = torch.tensor([7]), torch.tensor([24])
    assert baseline.target_forward_equivalents(0) == baseline.target_unet_evaluations(0) == 24  # rounds: forwards


def test_the_sampler_and_the_search_share_the_cost_model():
    search = LatentSearch(diffusion="tiny", num_steps=5, grad_mode=ResidualGradient(0.5))
    assert search.cost == SamplingCost(loop_length=5, branches=2, graphed_steps=3, checkpoint=False)
    assert search.cost.step(UNET_EVALUATIONS) == 10 + 6 and search.cost.step() == 10 + 12
