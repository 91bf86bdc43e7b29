"""ossgpt.training.host_memory: with freed memory kept, big blocks come from glibc's heap, not from fresh mmaps;
with freed memory returned, blocks from 1 MiB up get mmaps of their own, where glibc's defaults use the heap.

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
from ossgpt.training import host_memory
mode, nbytes = sys.argv[1], int(sys.argv[2])
if mode != "default" and not getattr(host_memory, mode + "_freed_memory")():
    print("unavailable")
    raise SystemExit
torch.ones(4 * 2**20)  # 16 MiB, freed at once: glibc's default threshold moves up to its size
block = torch.ones(nbytes // 4)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        print(start <= block.data_ptr() < end)
        raise SystemExit
print(False)  # no heap mapping at all
"""


def block_in_heap(mode: str, nbytes: int) -> str:
    """Whether a block of nbytes came from the heap ("True" or "False") in a fresh process after host_memory's
    `{mode}_freed_memory()` ("default": glibc's defaults); "unavailable" if that could not be set."""
    command = [sys.executable, "-c", SCRIPT, mode, str(nbytes)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and /proc/self/maps are glibc/Linux")
def test_big_blocks_come_from_the_heap_only_when_freed_memory_is_kept():
    kept = block_in_heap("keep", 64 << 20)
    if kept == "unavailable":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert kept == "True"
    assert block_in_heap("default", 64 << 20) == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and /proc/self/maps are glibc/Linux")
def test_blocks_from_a_mebibyte_up_get_mappings_of_their_own_when_freed_memory_is_returned():
    """What glibc's moving threshold puts in the heap (a 4 MiB block, after a 16 MiB one was freed) gets a mapping
    of its own, which freeing it unmaps."""
    returned = block_in_heap("return", 4 << 20)
    if returned == "unavailable":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert returned == "False"
    assert block_in_heap("default", 4 << 20) == "True"
