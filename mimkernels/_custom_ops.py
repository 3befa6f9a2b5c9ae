"""Kernel launchers that torch.compile sees as custom ops, and eager code calls directly.

``@custom_op_when_compiling(name, schema, fake)`` registers the launcher as the custom op ``mimkernels::<name>``
(schema written out, so no torch version has to infer it from annotations; ``fake`` gives output shapes,
dtypes and strides for tracing) and returns a function that calls the custom op while torch.compile traces,
and the launcher itself otherwise. Dynamo and Inductor then never look inside a launcher (no Triton kernel is
traced, no Python scalar becomes fp64), CUDA graphs capture the launches as they are, and eager calls skip
the custom op's dispatch, which on the 2-core test machine cost about 250 us per fwd+bwd pair
(benchmarks/NOTES.md). Autograd stays in each op's ``autograd.Function``, which Dynamo traces.
"""
from __future__ import annotations

import functools

import torch


def custom_op_when_compiling(name: str, schema: str, fake, tags=()):
    def wrap(launcher):
        op = torch.library.custom_op(f"mimkernels::{name}", launcher, mutates_args=(), schema=schema, tags=tags)
        op.register_fake(fake)

        @functools.wraps(launcher)
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            return launcher(*args)

        call.custom_op = op  # for torch.library.opcheck in the tests
        return call

    return wrap
