"""ossgpt.training.host_memory: with freed memory kept, big blocks come from glibc's heap, not from fresh mmaps.

glibc hands out a block above its mmap threshold (at most 32 MB by default) as a separate mapping and unmaps it
when freed; below the threshold, from the heap (the "[heap]" line of /proc/self/maps), where freed blocks stay
for reuse. Checked in fresh subprocesses, so that the test process keeps glibc's defaults. (What this saves, the
page faults of re-allocating such blocks every training step, is measured by bench/run.py, not here.)
"""

import subprocess
import sys

import pytest

SCRIPT = """
import sys
import torch
from ossgpt.training.host_memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unavailable")
    raise SystemExit
block = torch.ones(16 * 2**20)  # 64 MB
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        print(start <= block.data_ptr() < end)
        raise SystemExit
print(False)  # no heap mapping at all
"""


def block_in_heap(mode: str) -> str:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return result.stdout.split()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and /proc/self/maps are glibc/Linux")
def test_big_blocks_come_from_the_heap_only_when_freed_memory_is_kept():
    kept = block_in_heap("keep")
    if kept == "unavailable":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert kept == "True"
    assert block_in_heap("default") == "False"
