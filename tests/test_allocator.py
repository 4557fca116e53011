"""The malloc thresholds set by `load_backbone`: the forward pass stops faulting in fresh pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from graft.speed import allocator

# A fresh process per setting (the thresholds are process-wide and stay once set): load the real
# backbone, warm up, then count the minor page faults of three more batches of 64 in bf16 or fp32.
FAULTS_SCRIPT = """
import json, resource, torch
from graft.models.backbones import load_backbone
from graft.speed import allocator
from graft.speed.numerics import resolve_precision
from graft.training.features import forward_batches
torch.set_num_threads(2)
backbone = load_backbone()
batches = [torch.rand(64, 3, 224, 224)] * 3
precision = resolve_precision("auto", torch.device("cpu"))
forward_batches(backbone.model, batches[:2], precision=precision, device=torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
forward_batches(backbone.model, batches, precision=precision, device=torch.device("cpu"))
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "applied": allocator.reuse_freed_memory()}))
"""


def _faults(tune: str) -> dict:
    env = {**os.environ, "GRAFT_TUNE_MALLOC": tune}
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


@pytest.mark.skipif(not _glibc(), reason="needs Linux with glibc (the thresholds are glibc's mallopt)")
def test_loading_a_backbone_stops_the_forward_pass_faulting_in_fresh_pages():
    untuned, tuned = _faults("0"), _faults("1")
    assert untuned["applied"] is False and tuned["applied"] is True
    # Untuned, every large activation is a fresh mapping: hundreds of thousands of faults for
    # three batches (about 16 000 per 64 MB). Tuned, the heap reuses what the warm-up freed.
    assert untuned["faults"] > 100_000
    assert tuned["faults"] * 10 < untuned["faults"]


# More freed at the top of the heap than the old 1 GB trim threshold: glibc gave it back and the
# next allocation faulted it in again (the forward above, in about half of fresh processes, since
# its heap peaks just over 1 GB). glibc's own malloc, not torch's tensors: posix_memalign's slack
# and small chunks between tensors decide whether torch's frees coalesce; two 600 MB blocks freed
# side by side always do. Each stays under the 1 GB mmap threshold, so both come from the heap.
TRIM_SCRIPT = """
import ctypes, json, resource
from graft.speed import allocator
applied = allocator.reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def fill():
    blocks = [libc.malloc(600 * 2**20) for _ in range(2)]
    for block in blocks:
        ctypes.memset(block, 1, 600 * 2**20)
    for block in blocks:
        libc.free(block)
fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "applied": applied}))
"""


@pytest.mark.skipif(not _glibc(), reason="needs Linux with glibc (the thresholds are glibc's mallopt)")
@pytest.mark.parametrize("tune", ["0", "1"])
def test_a_gigabyte_freed_at_the_top_of_the_heap_stays_there_when_tuned(tune):
    done = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GRAFT_TUNE_MALLOC": tune})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] is (tune == "1")
    # 1.2 GB faulted in again is about 307 000 faults (glibc's defaults mmap each block; a 1 GB
    # trim threshold gives them back); kept on the heap, none.
    if tune == "1":
        assert result["faults"] < 3_000, result
    else:
        assert result["faults"] > 250_000, result


def test_the_thresholds_are_left_alone_when_asked(monkeypatch):
    monkeypatch.setenv("GRAFT_TUNE_MALLOC", "0")
    assert allocator._set_thresholds() is False


@pytest.mark.skipif(not _glibc(), reason="needs Linux with glibc (the thresholds are glibc's mallopt)")
def test_loading_a_bundle_sets_the_thresholds_too(trained_run):
    """predict, serve and export load a bundle, not a backbone: they get the thresholds as well."""
    script = (
        "import json, sys\nfrom graft.speed import allocator\nfrom graft.shipping.bundle import load_bundle\n"
        "assert allocator._applied is None\nload_bundle(sys.argv[1])\nprint(json.dumps(allocator._applied))"
    )
    done = subprocess.run([sys.executable, "-c", script, str(trained_run.bundle_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is True


# The server decodes in a pool of threads, each with its own malloc arena: with trimming off, what
# one large decoding freed stays in that arena, and each thread keeps its own copy of the peak.
RELEASE_SCRIPT = """
import io, json, threading, psutil
from PIL import Image
from graft.speed import allocator
allocator.reuse_freed_memory()
rss = lambda: psutil.Process().memory_info().rss
buffer = io.BytesIO()
Image.new("RGBA", (5000, 5000)).save(buffer, format="PNG")
png = buffer.getvalue()
def decode():  # 100 MB of RGBA and as much for its premultiplied copy, then freed
    Image.open(io.BytesIO(png)).reduce(8)
base = rss()
for _ in range(3):
    thread = threading.Thread(target=decode)
    thread.start()
    thread.join()
kept = rss() - base
released = allocator.release_free_memory()
print(json.dumps({"kept": kept, "after": rss() - base, "released": released}))
"""


@pytest.mark.skipif(not _glibc(), reason="needs Linux with glibc (malloc_trim)")
def test_release_free_memory_gives_back_what_decoding_threads_freed():
    done = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["released"] is True
    assert result["kept"] > 100 * 2**20, result  # freed, yet still in the process
    assert result["after"] < 32 * 2**20, result
