"""benchmarks/latent_search.py (Lightning overhead): its plain loop draws each target's scheduler noise from the
target's own generator, as the searches do, so a noisy scheduler runs and both sides make the same images."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import load_benchmark

bench = load_benchmark("latent_search.py", "latent_benchmark")


@pytest.mark.parametrize(("scheduler", "eta"), [("euler-a", 0.0), ("ddim", 0.5)])
def test_plain_loop_draws_the_searchs_noise_per_target(scheduler, eta):
    args = argparse.Namespace(stack="tiny", steps=2, targets=2, batch=2, iterations=1, scheduler=scheduler, eta=eta)
    search, data = bench.make_search(args, 1)
    search.prepare(data.targets)
    search.trainer = None
    assert search.sampler.draws_noise
    ids = torch.arange(len(search.targets))
    z = search.initial_latents(ids)
    cond = search.prompt_embeddings([t.prompt for t in search.targets])
    with torch.no_grad():
        torch.manual_seed(0)
        plain = bench.plain_images(search.sampler, search.targets, z, cond, search.prompt_embeddings([""]), ids)
        torch.manual_seed(1)  # the global random state plays no part
        searched = search.generate(z, cond, [t.seed for t in search.targets])
    assert torch.equal(plain, searched)
    assert bench.plain_seconds_per_iteration(args) > 0  # the timed loop runs with a noisy scheduler
