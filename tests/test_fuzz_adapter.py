"""Issue 8, item 1: the adapter loader under fuzzing.

Random, truncated, bit-flipped and shape-mangled files, wrong metadata types and huge declared sizes
are fed to ``read_adapter`` and ``Library.import_file``. The outcome is always either a valid
adapter (a mutation may leave the file valid, e.g. a flipped mantissa bit) or the documented
``AdapterFormatError`` (for imports: a ``SpectralDiffusionError`` such as a taken slot), never another
exception, never a hang, and never an allocation driven by a declared size: a corpus is re-read in a
child process whose address space is capped (``RLIMIT_AS``) a little above its size at start.

Hypothesis runs derandomized with no example database, so every run (and CI) tries the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.reliability.mutations import MUTATORS, check_accepted, join, split, tensor_keys
from spectral_diffusion.errors import AdapterFormatError, SpectralDiffusionError
from spectral_diffusion.formats.adapter_file import MAX_FILE_BYTES, MAX_HEADER_BYTES, read_adapter, save_adapter
from spectral_diffusion.formats.bundle import read_bundle, write_bundle
from spectral_diffusion.library.store import Library

from .reliability_helpers import (
    PYTHON,
    ROOT,
    child_env,
    leftovers,
    make_adapter,
    record_stats,
    snapshot,
)

FIXED_TIME = "2025-01-01T00:00:00+00:00"
CALL_LIMIT_S = 5.0  # one read of a ~200 KB file takes milliseconds; anything near this is a hang
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TALLY: Counter = Counter()  # outcomes of every input tried, for docs/reliability.md


def read_once(path: Path, kind: str) -> str:
    started = time.perf_counter()
    try:
        data = read_adapter(path)
    except AdapterFormatError as error:
        outcome = "refused"
        assert str(error).startswith(path.name), error  # the message names the file
    else:
        outcome = "accepted"
        check_accepted(data)
    elapsed = time.perf_counter() - started
    assert elapsed < CALL_LIMIT_S, f"read_adapter took {elapsed:.1f} s"
    TALLY[(kind, outcome)] += 1
    TALLY[("slowest_ms", "")] = max(TALLY[("slowest_ms", "")], round(elapsed * 1000))
    return outcome


class Sample(bytes):
    """A valid file's bytes, with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<valid file, {len(self)} bytes>"


@pytest.fixture(scope="module")
def valid(models_home, tmp_path_factory) -> Sample:
    folder = tmp_path_factory.mktemp("fuzz-valid")
    data = dataclasses.replace(make_adapter("fuzzed", 3), created_at=FIXED_TIME)  # same bytes every run
    return Sample(save_adapter(data, folder / "valid.safetensors").read_bytes())


@pytest.fixture(scope="module")
def valid_bundle(models_home, tmp_path_factory) -> Sample:
    folder = tmp_path_factory.mktemp("fuzz-bundle")
    concepts = {
        "dog": dataclasses.replace(make_adapter("dog", 1), created_at=FIXED_TIME),
        "cat": dataclasses.replace(make_adapter("cat", 2, variant="rotational", seed=1), created_at=FIXED_TIME),
    }
    header, data = split(write_bundle(concepts, folder / "bundle.safetensors", {"dog": 1.0, "cat": 0.5}).read_bytes())
    header["__metadata__"]["created_at"] = FIXED_TIME  # same bytes every run
    return Sample(join(header, data))


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, outcome), count in TALLY.items():
        if kind != "slowest_ms":
            by_kind.setdefault(kind, {})[outcome] = count
    record_stats(
        "fuzz",
        inputs=sum(sum(v.values()) for v in by_kind.values()),
        by_kind=by_kind,
        slowest_ms=TALLY[("slowest_ms", "")],
        unexpected=0,
    )


# ----- the tests ------------------------------------------------------------------------------------


def test_the_unmutated_file_is_accepted(valid, tmp_path):
    path = tmp_path / "valid.safetensors"
    path.write_bytes(valid)
    assert read_once(path, "unmutated") == "accepted"
    assert split(join(*split(valid)))[0] == split(valid)[0]  # the mutators' re-serialisation is faithful
    assert read_once(_write(tmp_path, join(*split(valid))), "unmutated") == "accepted"


def _write(folder: Path, content: bytes, name: str = "fuzzed.safetensors") -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["random bytes", "truncated", "bit flips"])
@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_byte_level_damage_gives_the_documented_error(valid, tmp_path, kind, rng):
    read_once(_write(tmp_path, MUTATORS[kind](rng, valid)), kind)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["header/shape mangled", "metadata mangled", "tensor data mangled"])
@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_structural_damage_gives_the_documented_error(valid, tmp_path, kind, rng):
    read_once(_write(tmp_path, MUTATORS[kind](rng, valid)), kind)


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=80)
@given(rng=st.randoms(use_true_random=False), kind=st.sampled_from(sorted(MUTATORS)))
def test_damaged_fused_bundles_give_the_documented_error(valid_bundle, tmp_path, rng, kind):
    """The fused-bundle reader (``studio.read_bundle``) is an adapter loader too."""
    path = _write(tmp_path, MUTATORS[kind](rng, valid_bundle))
    started = time.perf_counter()
    try:
        datas = read_bundle(path)
    except AdapterFormatError as error:
        TALLY[("bundle " + kind, "refused")] += 1
        assert str(error).startswith(path.name), error
    else:
        TALLY[("bundle " + kind, "accepted")] += 1
        for data in datas:
            check_accepted(data)
    assert time.perf_counter() - started < CALL_LIMIT_S


@pytest.fixture(scope="module")
def import_library(valid, tmp_path_factory):
    """A library holding one concept in slot 0, the fuzzed concept's slot 3 free."""
    library = Library(tmp_path_factory.mktemp("fuzz-import") / "concepts")
    library.add(make_adapter("resident", 0))
    return library


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=60)
@given(
    rng=st.randoms(use_true_random=False),
    kind=st.sampled_from(["bit flips", "header/shape mangled", "metadata mangled"]),
)
def test_import_of_a_damaged_file_refuses_and_leaves_the_library_unchanged(valid, import_library, tmp_path, rng, kind):
    library = import_library
    before = snapshot(library.root)
    path = _write(tmp_path, MUTATORS[kind](rng, valid))
    started = time.perf_counter()
    try:
        record = library.import_file(path)
    except SpectralDiffusionError:
        TALLY[("import " + kind, "refused")] += 1
        assert snapshot(library.root) == before
    else:
        TALLY[("import " + kind, "accepted")] += 1
        check_accepted(library.adapter(record.name))
        library.delete(record.name)
        assert snapshot(library.root) == before
    assert time.perf_counter() - started < CALL_LIMIT_S
    assert leftovers(library.root) == []


# ----- huge declared sizes, under a hard memory cap -------------------------------------------------


def hostile_corpus(valid: bytes, folder: Path, seeded: int = 60) -> int:
    """Files declaring huge sizes, plus ``seeded`` mutants from a fixed seed. Returns the file count."""
    header, data = split(valid)
    key = tensor_keys(header)[0]
    files: dict[str, bytes] = {"valid.safetensors": valid}

    def with_entry(**changes) -> bytes:
        copy = json.loads(json.dumps(header))
        copy[key].update(changes)
        return join(copy, data)

    files["header-len-2^63.safetensors"] = struct.pack("<Q", 2**63 - 1) + valid[8:]
    files["header-len-2^64-1.safetensors"] = struct.pack("<Q", 2**64 - 1) + valid[8:]
    files["header-len-filesize.safetensors"] = struct.pack("<Q", len(valid)) + valid[8:]
    files["shape-2^31-squared-f64.safetensors"] = with_entry(shape=[2**31 - 1, 2**31 - 1], dtype="F64")
    files["shape-2^62.safetensors"] = with_entry(shape=[2**62])
    files["shape-2^30-x4.safetensors"] = with_entry(shape=[2**30] * 4)
    files["shape-huge-offsets-huge.safetensors"] = with_entry(shape=[2**20, 2**20], data_offsets=[0, 2**42])
    files["offsets-2^64.safetensors"] = with_entry(data_offsets=[0, 2**64 + 7])
    files["offsets-negative.safetensors"] = with_entry(data_offsets=[-(2**40), 512])
    copy = json.loads(json.dumps(header))
    copy["__metadata__"]["rank"] = "1000000"
    files["rank-1e6.safetensors"] = join(copy, data)
    copy = json.loads(json.dumps(header))
    copy["__metadata__"]["tokens"] = json.dumps([f"<t{i}>" for i in range(100_000)])
    files["tokens-100k.safetensors"] = join(copy, data)
    copy = json.loads(json.dumps(header))
    for i in range(20_000):
        copy[f"unet.extra{i}.A"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}
    files["20k-empty-tensors.safetensors"] = join(copy, data)
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    files["header-nested-100k.safetensors"] = struct.pack("<Q", len(deep)) + deep
    for field in ("tokens", "targets", "train_config"):
        copy = json.loads(json.dumps(header))
        copy["__metadata__"][field] = "[" * 100_000 + "]" * 100_000
        files[f"{field}-nested-100k.safetensors"] = join(copy, data)
    rng = random.Random(8)
    kinds = sorted(MUTATORS)
    for i in range(seeded):
        kind = kinds[i % len(kinds)]
        files[f"seeded-{i:03d}-{kind.replace('/', '-').replace(' ', '-')}.safetensors"] = MUTATORS[kind](rng, valid)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    # declared by the file system: 9 GB and 65 MB sparse files (no disk blocks used)
    with open(folder / "sparse-9GB.safetensors", "wb") as handle:
        handle.write(valid[: 8 + 16])
        handle.truncate(MAX_FILE_BYTES + 2**30)
    with open(folder / "sparse-65MB-header.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        handle.truncate(MAX_HEADER_BYTES + 2**20)
    return len(files) + 2


@pytest.mark.timeout(300)
def test_huge_declared_sizes_allocate_nothing_under_a_memory_cap(valid, tmp_path):
    count = hostile_corpus(valid, tmp_path)
    result = subprocess.run(
        [PYTHON, str(ROOT / "tests" / "fuzz_worker.py"), str(tmp_path), "512"],
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cap_enforced"], "the address-space cap did not stop a 1 GB allocation"
    outcomes = report["outcomes"]
    assert len(outcomes) == count
    unexpected = {name: what for name, what in outcomes.items() if what.startswith("UNEXPECTED")}
    assert unexpected == {}
    huge = [name for name in outcomes if not name.startswith(("seeded-", "valid"))]
    assert all(outcomes[name] == "AdapterFormatError" for name in huge), {n: outcomes[n] for n in huge}
    assert outcomes["valid.safetensors"] == "accepted"
    assert report["peak_rss_growth_mb"] < 100, report
    assert report["slowest_s"] < CALL_LIMIT_S, report
    refused = sum(1 for what in outcomes.values() if what == "AdapterFormatError")
    record_stats(
        "fuzz-memory-cap",
        files=count,
        refused=refused,
        accepted=count - refused,
        unexpected=len(unexpected),
        peak_rss_growth_mb=round(report["peak_rss_growth_mb"], 1),
        slowest_ms=round(report["slowest_s"] * 1000),
        headroom_mb=report["headroom_mb"],
    )


@pytest.mark.parametrize("bad_name", ["../evil", "", "a.b"])
def test_load_adapter_refuses_a_name_it_cannot_load(valid, tmp_path, bad_name):
    """Found by ``bench/reliability/run.py fuzz --long``: the name keys torch modules, so "../evil" gave KeyError."""
    from spectral_diffusion.formats.adapter_file import load_adapter

    from .reliability_helpers import tiny_adapters

    header, data = split(valid)
    header["__metadata__"]["name"] = bad_name
    path = _write(tmp_path, join(header, data))
    adapters = tiny_adapters()[1]
    with pytest.raises(AdapterFormatError, match="cannot be loaded"):
        load_adapter(adapters, path)
    assert "fuzzed" not in adapters.concepts and bad_name not in adapters.concepts
