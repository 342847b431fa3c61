"""The streaming-store threshold follows the machine's last-level cache (fastbn._machine),
and the kernels' cache directory follows the threshold."""

import os
import subprocess
import sys

import pytest

from fastbn import _cache, _machine

MiB = 1 << 20


@pytest.fixture
def unpinned(monkeypatch):
    """No FASTBN_STREAM_MIN_BYTES (conftest pins one for the other tests)."""
    monkeypatch.delenv(_machine.STREAM_ENV, raising=False)
    return monkeypatch


@pytest.mark.parametrize("llc, expected", [
    (32 * MiB, 16 * MiB),     # half the cache
    (6 * MiB, 4 * MiB),       # never below 4 MiB
    (512 * MiB, 64 * MiB),    # never above 64 MiB
    (None, 4 * MiB),          # unknown: 4 MiB
])
def test_half_the_last_level_cache_within_bounds(unpinned, llc, expected):
    unpinned.setattr(_machine, "last_level_cache_bytes", lambda: llc)
    assert _machine.stream_min_bytes() == expected


def test_the_environment_overrides_it(unpinned):
    unpinned.setattr(_machine, "last_level_cache_bytes", lambda: 32 * MiB)
    unpinned.setenv(_machine.STREAM_ENV, " 12345 ")
    assert _machine.stream_min_bytes() == 12345


@pytest.mark.parametrize("text", ["0", "-5", "4MiB", "1e6"])
def test_a_bad_override_is_refused_by_name(unpinned, text):
    unpinned.setenv(_machine.STREAM_ENV, text)
    with pytest.raises(ValueError, match=_machine.STREAM_ENV):
        _machine.stream_min_bytes()


def test_the_cache_size_read_here_is_a_size():
    llc = _machine.last_level_cache_bytes()
    assert llc is None or llc >= 64 << 10


def test_the_threshold_is_part_of_the_kernels_digest(unpinned):
    """Kernels compiled for one threshold are never loaded for another."""
    digests = set()
    for value in (4 * MiB, 16 * MiB):
        unpinned.setenv(_machine.STREAM_ENV, str(value))
        unpinned.setattr(_cache, "_digest", None)
        digests.add(_cache.code_digest())
    assert len(digests) == 2


def test_the_kernels_compile_in_the_threshold_of_their_process():
    code = ("from fastbn._cpu.kernels import codegen; from fastbn import _machine; "
            "print(codegen.STREAM_MIN_BYTES, _machine.stream_min_bytes())")
    env = {k: v for k, v in os.environ.items() if k != _machine.STREAM_ENV}
    for extra in ({}, {_machine.STREAM_ENV: str(7 * MiB)}):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                             capture_output=True, text=True, timeout=120, check=True).stdout
        compiled, wanted = map(int, out.split())
        assert compiled == wanted
        if extra:
            assert compiled == 7 * MiB
