"""training.py helpers: keep_freed_memory's effect on the page faults of large temporaries."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a fresh process allocates and frees a 256 MiB tensor, then two somewhat smaller ones (as the
# loss's temporaries vary with the batch), and counts the minor page faults of touching those
# (the first touch of a fresh page is one fault)
PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
import torch, training
applied = training.keep_freed_memory() if sys.argv[1] == "1" else False
n = 64 * 2**20
torch.empty(n).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for m in (n - 2**20, n - 3 * 2**20):
    torch.empty(m).fill_(2.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, 2 * n * 4 // 4096)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reuses_pages_of_large_temporaries():
    out = {}
    for on in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), on], capture_output=True, text=True,
                           check=True)
        applied, faults, pages = r.stdout.split()
        out[on] = (applied, int(faults), int(pages))
    assert out["1"][0] == "True" and out["0"][0] == "False"
    assert out["0"][1] > out["0"][2] // 2          # glibc's default: a fresh mapping, every page faults
    assert out["1"][1] < out["1"][2] // 20         # kept: the freed block is reused in place
