"""``python -m benchmarks``: every benchmark family, results under benchmarks/results/<device>/."""
import re
import sys

import torch

from benchmarks import (
    bench_attention,
    bench_integrations,
    bench_mlp,
    bench_models,
    bench_norms,
    bench_patch_embed,
    bench_tokens,
)

FAMILIES = {"attention": bench_attention, "tokens": bench_tokens, "patch_embed": bench_patch_embed,
            "norms": bench_norms, "mlp": bench_mlp, "models": bench_models, "integrations": bench_integrations}


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU; none here")
        return 0
    out = "benchmarks/results/" + re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_")
    return max(family.main(["--out", out] + sys.argv[1:]) for family in FAMILIES.values())


if __name__ == "__main__":
    sys.exit(main())
