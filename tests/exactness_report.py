"""The exactness figures of docs/models.md: mcserve against the reference libraries, on the
random-initialised checkpoints of tests/test_import_*.py (a script, not a test):

    python -m tests.exactness_report

For each configuration: the largest |logit difference| over 320 tokens (fp32) of mcserve's
chunked, naive and prefill (133 tokens) + decode paths against the reference's forward, and the
largest |logit| for scale.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # fla's kernels on the CPU

import torch

import models
from tests.reference_helpers import path_errors, save_reference, tokens


def report(library: str, module) -> None:
    for name in sorted(module.CONFIGS):
        reference = module.reference_model(name)
        model = models.load(save_reference(reference, Path(tempfile.mkdtemp()) / "m"))
        ids = tokens()
        with torch.no_grad():
            scale = reference(ids).logits.abs().max().item()
        diffs = path_errors(reference, model, ids)
        cells = " | ".join(f"{diffs[k]:.1e}" for k in ("chunked", "naive", "prefill+decode"))
        print(f"| {library} | {name} | {module.CONFIGS[name]} | {cells} | {scale:.2f} |", flush=True)


def main() -> None:
    import warnings
    warnings.simplefilter("ignore")
    from tests import test_import_gated_deltanet as gdn
    from tests import test_import_mamba2 as mamba2
    print("| reference | config | keys | chunked | naive | prefill + decode | max abs logit |")
    print("|---|---|---|---:|---:|---:|---:|")
    report("transformers Mamba2ForCausalLM", mamba2)
    report("fla GatedDeltaNetForCausalLM (fused_recurrent)", gdn)


if __name__ == "__main__":
    main()
