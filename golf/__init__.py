"""Shared library of the toolkit: knobs, distributed plumbing, exact bpb, evaluation, run logs."""
