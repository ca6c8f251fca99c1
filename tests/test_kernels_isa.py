"""The kernels on every vector ISA this machine can run, each compiled in a process of its own (Numba
compiles for one CPU per process), and a Numba cache shared by processes compiling for different ISAs."""

import json
import os
import pickle
import platform
import subprocess
import sys
from pathlib import Path

import isa_checks
import pytest

from charlm.kernels.target import compile_target

CHECKS = Path(__file__).with_name("isa_checks.py")
HOST = compile_target()
# The lower ISAs an x86-64 host runs (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES; empty features: the CPU name's own).
X86 = platform.machine().lower() in ("x86_64", "amd64")
LOWER = {"sse": ("generic", "")} if X86 else {}
if X86 and HOST.isa == "avx512":
    LOWER["avx2"] = ("haswell", "")


def start(cache_dir: Path, cpu: tuple[str, str] | None, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    if cpu is not None:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = cpu
    return subprocess.Popen([sys.executable, str(CHECKS), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def report(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each lower ISA's full checks (at once, one core each); then, in the cache dir the highest lower ISA
    wrote, the host's product checks (its gradients and generation are checked in this process, whose
    kernels other tests compiled already) and that ISA's again."""
    shared = tmp_path_factory.mktemp("numba-cache")
    lower = list(LOWER)
    processes = {isa: start(shared if isa == lower[-1] else tmp_path_factory.mktemp(isa), LOWER[isa])
                 for isa in lower}
    results = {isa: report(process) for isa, process in processes.items()}
    results["host"] = report(start(shared, None, "--products-only"))
    if lower:
        results["again"] = report(start(shared, LOWER[lower[-1]], "--products-only"))
    return results, shared


def check(result: dict, isa: str) -> None:
    assert result["target"]["isa"] == isa
    assert result["tile"]["vector_bytes"] == result["target"]["vector_bytes"]
    assert result["float32_product_error"] < 1e-4
    assert result["float64_product_error"] < 1e-12
    if "gradient_error" in result:
        assert result["gradient_error"] < 1e-4
        assert result["generation_mismatches"] == 0


def test_host_gradients_with_tiles_and_generation_in_this_process():
    assert isa_checks.gradient_error() < 1e-4
    assert isa_checks.generation_mismatches() == 0


def test_kernels_are_right_on_every_isa_the_machine_runs(runs):
    results, _ = runs
    check(results["host"], HOST.isa)
    for isa in LOWER:
        check(results[isa], isa)
    if "avx2" in LOWER:
        assert results["avx2"]["tile"]["rows"] == 6 and results["host"]["tile"]["rows"] == 8


@pytest.mark.skipif(not LOWER, reason="no lower ISA to compile for on this machine")
def test_a_cache_shared_by_two_isas_keeps_a_compiled_kernel_per_isa_and_tile(runs):
    results, shared = runs
    lower = list(LOWER)[-1]
    check(results["again"], lower)
    [index] = shared.rglob("gemm.add_row_products-*.nbi")
    with open(index, "rb") as file:
        pickle.load(file)  # Numba's version
        _, overloads = pickle.loads(file.read())
    # Index keys: (signature, (triple, CPU name, features), code hashes). Each process found none of its own
    # and added one; the signatures differ too, by their tile types.
    cpus = {key[1][1] for key in overloads}
    assert {LOWER[lower][0], HOST.cpu_name} <= cpus
    tiles = {str(key[0][-1]) for key in overloads}
    assert len(tiles) >= 2
