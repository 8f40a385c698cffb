"""The Triton kernels compile for a GPU, without one: no compile error, no spill, shared memory in budget.

``tools/gpu/compile_check.py`` compiles the kernels with Triton's real compiler down to cubin
for sm_90 (a stand-in driver names the target) and reads each binary's registers, spills and
shared memory.  The compile itself runs only when selected (``-m gpu_compile``; CI's own line
in .ci/run, about 3-4 minutes on 2 cores): ``make test`` stays fast.  The cheap checks run
always: the committed resource table was made from the current kernel sources, and every
autotune key keeps at least one config.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-compile-check.py"
TABLE = ROOT / "kernels" / "RESOURCES.md"


def _check_module():
    from tools.gpu import compile_check

    return compile_check


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    return env


def test_resource_table_matches_the_kernel_sources():
    """kernels/RESOURCES.md is regenerated (``make gpu-resources``) whenever a kernel changes."""
    text = TABLE.read_text()
    recorded = re.search(r"^sources: (\w+)", text, re.MULTILINE).group(1)
    digest = subprocess.run(
        [sys.executable, str(SCRIPT), "--digest"], cwd=ROOT, env=_env(), capture_output=True, text=True, check=True
    ).stdout.strip()
    assert recorded == digest, (
        "kernels/RESOURCES.md was made from other kernel sources: run `make gpu-resources` "
        "(the full matrix, sm_80 and sm_90) and commit the table"
    )


def test_resource_table_has_no_failing_kept_config():
    rows = [line for line in TABLE.read_text().splitlines() if re.match(r"\| .* \| kept \|", line)]
    assert rows
    bad = [line for line in rows if not re.search(r"\| (ok|ok \(255 regs\)) \|$", line)]
    assert not bad, "kept configs that fail:\n" + "\n".join(bad[:20])


def test_every_attention_autotune_key_keeps_a_config():
    """The pruning leaves at least one config for every target, dtype, head size and dropout, and one
    that is not itself dropped (a spilling fallback) except where no config of the width can serve."""
    import torch
    from bertfast.kernels import attention as A

    for kernel in ("fwd", "dkdv", "dq"):
        configs = [c for width in A._CONFIGS[kernel].values() for c in width]
        for sm, fp32, head_dim, dropout in itertools.product((80, 90), (False, True), range(1, 129), (False, True)):
            hdp = A._head_dim_padded(head_dim)
            kept = A.kept_configs(kernel, configs, fp32=fp32, head_dim_padded=hdp, dropout=dropout, sm=sm)
            assert kept, f"{kernel}: no config left for sm_{sm} fp32={fp32} head_dim {head_dim} dropout={dropout}"
            width = A._CONFIGS[kernel][32 if fp32 else 16]
            assert all(c in width for c in kept), "a config of the other operand width was kept"
            key = (32 if fp32 else 16, hdp, dropout)
            dropped = {
                *A._DROPPED.get((kernel, 90, *key), ()),
                *(A._DROPPED.get((kernel, 80, *key), ()) if sm < 90 else ()),
            }
            if len(dropped) < len(width):
                assert not any(A._shape(c) in dropped for c in kept)

    # The hook the autotuner calls reads the key from the launch.
    prune = A._pruner("dkdv")
    configs = [c for width in A._CONFIGS["dkdv"].values() for c in width]
    kept = prune(
        configs, {"Q": torch.empty(0, dtype=torch.bfloat16)}, HEAD_DIM=64, HEAD_DIM_PADDED=64, HAS_DROPOUT=True
    )
    assert kept and all(c in A._CONFIGS["dkdv"][16] for c in kept)


@pytest.mark.gpu_compile
def test_kernels_compile_for_sm90_without_spills(tmp_path, request):
    """BERT's own path (bf16 and fp16, head_dim 64, padded / masked / varlen, with and without
    dropout) and LayerNorm and bias-GELU, every config the autotuner can pick, for sm_90 under the
    pinned Triton, plus the csrc/ CUDA kernels; and the numbers agree with the committed table."""
    if "gpu_compile" not in (request.config.getoption("-m") or ""):
        pytest.skip("compiles for minutes: select with -m gpu_compile (CI does)")
    out = tmp_path / "rows.json"
    cmd = ["nice", sys.executable, str(SCRIPT), "--arch", "90", "--subset", "ci", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    print(result.stdout[-4000:], result.stderr[-4000:])
    assert result.returncode == 0, f"GPU compile check failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    assert any(r["kernel"] == "_attn_fwd_kernel" and r["variant"] == "bfloat16 d=64 padded dropout" for r in rows)

    # What CI compiled must read the same in the committed table (a stale or hand-edited table fails).
    table = {}
    for line in TABLE.read_text().split("## sm_90", 1)[-1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[4].isdigit():
            table[(cells[0], cells[1], cells[2])] = (int(cells[4]), cells[5])
    import triton

    if triton.__version__ not in TABLE.read_text():
        pytest.skip(f"the table was made under another Triton than {triton.__version__}")
    differ = []
    for r in rows:
        if r.get("error") or r["op"] == "cuda":
            continue
        want = table.get((r["kernel"], r["variant"], r["config"]))
        got = (r["reg"], f"{r['stack']}/{r['local']}")
        if want != got:
            differ.append(f"{r['kernel']} [{r['variant']}] {r['config']}: table {want}, compiled {got}")
    assert not differ, "kernels/RESOURCES.md disagrees with the compiler:\n" + "\n".join(differ[:20])
