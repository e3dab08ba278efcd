"""Tiny research-trainer models for the tests/test_v2_*.py files."""
import torch

import train_gpt_v2 as v2
from golf.config import parse_knobs
from tests.test_record_stack import SMALL, randomised

# the record stack's tiny test shape; ROPE_DIMS left at its default (16 = the head dim) so that
# position encodings without RoPE can be chosen without setting a knob that would do nothing
SMALL_V2 = {k: v for k, v in SMALL.items() if k != "ROPE_DIMS"}


def cfg_of(**overrides):
    return v2.resolve(parse_knobs(v2.KNOBS, {**SMALL_V2, **{k: str(v) for k, v in overrides.items()}}))


def build(seed=0, randomise=True, **overrides) -> v2.GPTv2:
    """A GPTv2 of SMALL_V2 + overrides; randomise: every parameter N(0, 0.2^2) (zero inits hide bugs)."""
    torch.manual_seed(seed)
    model = v2.GPTv2(cfg_of(**overrides))
    return randomised(model, seed) if randomise else model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
