import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import spectral_diffusion.images as images_module
import spectral_diffusion.library.records as records_module
import spectral_diffusion.library.reservations as reservations_module
from spectral_diffusion.core.config import ConceptInfo, TargetConfig
from spectral_diffusion.core.model import SpectralAdapters
from spectral_diffusion.core.tokens import TokenError
from spectral_diffusion.errors import AdapterFormatError, ConceptNotFoundError, LibraryError, SlotConflictError
from spectral_diffusion.formats.adapter_file import adapter_from_model, read_adapter, save_adapter
from spectral_diffusion.formats.bundle import write_bundle
from spectral_diffusion.library.names import NAME_PATTERN
from spectral_diffusion.library.records import ConceptRecord
from spectral_diffusion.library.reservations import Reservation
from spectral_diffusion.library.store import Library
from spectral_diffusion.models.registry import load_pipeline

from . import library_worker
from .conftest import trained_looking_adapter

RANK = 4


@pytest.fixture(scope="module")
def maker(models_home):
    """make(name, slot, rank) -> AdapterData of a trained-looking concept of builtin:tiny."""
    adapters = SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny"))

    def make(name, slot, rank=RANK, variant="additive", seed=0):
        return trained_looking_adapter(adapters, name, slot, rank, variant, seed)

    make.fingerprint = adapters.fingerprint
    make.capacity = adapters.capacity
    return make


@pytest.fixture
def lib(tmp_path):
    return Library(tmp_path / "concepts")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its bytes: equal snapshots = byte-for-byte unchanged."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def try_reserve(lib, *args, **kwargs):
    with lib.reserve(*args, **kwargs):
        pass


def other_model(data, fingerprint="f" * 16):
    return dataclasses.replace(data, base_fingerprint=fingerprint, base_model="other-model")


# ----- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "cannot be empty"),
        ("..", "looks like a path"),
        ("../evil", "looks like a path"),
        ("a/b", "looks like a path"),
        ("a\\b", "looks like a path"),
        (".hidden", "looks like a path"),
        ("My-Dog", "lowercase: use 'my-dog'"),
        ("x" * 65, "65 characters long; 64 at most"),
        ("-dog", "not valid"),
        ("my dog", "not valid"),
        ("chien-é", "not valid"),
        ("dog\n", "not valid"),
        ("con", "reserved device name"),
    ],
)
def test_bad_names_are_refused(lib, name, problem):
    with pytest.raises(LibraryError, match=problem):
        lib.validate_name(name)
    assert not lib.exists(name)


def test_good_names(lib):
    for name in ("dog", "my-dog_2", "0", "x" * 64):
        assert lib.validate_name(name) == name


def test_the_longest_name_has_a_valid_default_token_and_round_trips(maker, lib, tmp_path):
    """Issue 24 item 6: every valid name's default token <name> is a valid token, through every check."""
    from spectral_diffusion.core.tokens import default_token
    from spectral_diffusion.errors import RequestError
    from spectral_diffusion.frontends.workflows import TrainRequest
    from spectral_diffusion.generation.request import GenerationRequest, check_prompt_tokens

    name = "x" * 64
    assert lib.validate_name(name) == name and default_token(name) == f"<{name}>"
    assert TrainRequest(name, tmp_path).config("builtin:tiny", lib.root).tokens == [f"<{name}>"]
    data = maker(name, 0)  # a concept made, saved and read back with that token
    read_back = read_adapter(save_adapter(data, tmp_path / "long.safetensors"))
    assert read_back.info.tokens == [f"<{name}>"]
    assert lib.add(read_back).tokens == [f"<{name}>"]
    # the prompt check sees the long token (an unchosen concept's token is refused, not ignored)
    with pytest.raises(RequestError, match="is not selected"):
        check_prompt_tokens(GenerationRequest(prompt=f"a <{name}>"), {name: [f"<{name}>"]}, [])


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=70), st.from_regex(NAME_PATTERN, fullmatch=True)))
def test_accepted_names_stay_inside_the_root(name):
    root = Path("/library/root")
    try:
        Library.validate_name(name)
    except LibraryError:
        return
    assert (root / name).resolve().parent == root


def test_path_tricks_write_nothing_outside(maker, lib, tmp_path):
    data = maker("dog", 0)
    with pytest.raises(LibraryError, match="looks like a path"):
        lib.add(dataclasses.replace(data, info=dataclasses.replace(data.info, name="../evil")))
    path = save_adapter(data, tmp_path / "dog.safetensors")
    with pytest.raises(LibraryError, match="looks like a path"):
        lib.import_file(path, name="../../evil")
    with pytest.raises(LibraryError, match="looks like a path"):
        lib.get("../concepts/dog")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.safetensors"]  # not even the root was made
    assert lib.list() == []


# ----- adding, layout, reading ---------------------------------------------------------------------


def test_add_writes_the_concept_folder(maker, lib, tmp_path):
    rgb = tmp_path / "a.jpg"
    Image.new("RGB", (600, 300), (200, 10, 10)).save(rgb)
    palette = Image.new("P", (40, 40))
    record = lib.add(maker("dog", 1), images=[rgb, palette], preview=Image.new("RGB", (64, 64)))

    folder = lib.root / "dog"
    assert {p.name for p in folder.iterdir()} == {
        "adapter.safetensors",
        "concept.json",
        "preview.png",
        "images",
        "thumbnails",
    }
    meta = json.loads((folder / "concept.json").read_text())
    assert meta["image_count"] == 2 and meta["thumbnails"] == ["thumbnails/image-000.png", "thumbnails/image-001.png"]
    assert meta["images"] == ["images/image-000.png", "images/image-001.png"]
    assert meta["slot"] == 1 and meta["rank"] == RANK and meta["tokens"] == ["<dog>"]
    assert meta["base_fingerprint"] == maker.fingerprint and meta["smallest_dim"] == 32
    assert meta["train_config"] == {"steps": 1}
    assert Image.open(folder / "images/image-000.png").size == (600, 300)
    assert max(Image.open(folder / "thumbnails/image-000.png").size) == 256
    assert Image.open(folder / "images/image-001.png").format == "PNG"

    assert record == lib.get("dog")
    assert record.token == "<dog>" and record.preview_path == folder / "preview.png"
    assert record.created_at == read_adapter(record.adapter_path).created_at
    json.dumps(record.to_json())
    stored = lib.adapter("dog")
    assert stored.info == record_info(record)
    key = next(iter(stored.layers))
    torch.testing.assert_close(stored.layers[key]["A"], maker("dog", 1).layers[key]["A"], rtol=0, atol=0)


def record_info(record: ConceptRecord) -> ConceptInfo:
    return ConceptInfo(record.name, record.slot, record.rank, record.variant, record.tokens, record.class_word)


def test_unreadable_image_is_refused_and_leaves_nothing(maker, lib, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(LibraryError, match="image bad.png cannot be read"):
        lib.add(maker("dog", 0), images=[bad])
    assert not lib.exists("dog")
    assert [p.name for p in lib.root.iterdir()] == [".library.lock"]


def test_decompression_bomb_image_is_refused_and_changes_nothing(maker, lib, tmp_path, monkeypatch):
    lib.add(maker("dog", 0))
    before = snapshot(lib.root)
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(big)
    monkeypatch.setattr(images_module, "MAX_PIXELS", 1000)  # 64x64 = 4096 pixels: a "bomb" here
    with pytest.raises(LibraryError) as refused:
        lib.add(maker("cat", 1), images=[big])
    message = str(refused.value)
    assert message.startswith("image big.png cannot be read") and "64x64" in message
    assert snapshot(lib.root) == before and [r.name for r in lib.list()] == ["dog"]


def test_records_hold_a_concept_info(maker, lib):
    record = lib.add(maker("dog", 2))
    assert record.info == ConceptInfo("dog", 2, RANK, "additive", ["<dog>"], "dog")
    assert record.columns == range(2 * RANK, 3 * RANK)
    assert set(record.to_json()) == {
        "name",
        "tokens",
        "slot",
        "rank",
        "variant",
        "class_word",
        "base_model",
        "base_fingerprint",
        "created_at",
        "image_count",
        "folder",
        "adapter_path",
        "preview_path",
        "thumbnails",
        "images",
        "metadata",
        "token",
    }


def test_reservation_files_keep_their_format(lib):
    old = {
        "name": "cat",
        "base_fingerprint": "fp",
        "rank": RANK,
        "slot": 1,
        "tokens": ["<cat>"],
        "pid": 1,
        "pid_start": None,
        "host": "h",
        "created": 0.0,
        "id": "x",
        "created_at": "1970-01-01T00:00:00+00:00",
    }
    reservation = Reservation.from_json(old)
    assert (reservation.name, reservation.slot, reservation.rank, reservation.tokens) == ("cat", 1, RANK, ["<cat>"])
    assert reservation.columns == range(RANK, 2 * RANK)
    assert reservation.to_json() == old and list(reservation.to_json()) == list(old)


def test_list_get_and_missing(maker, lib):
    lib.add(maker("b-cat", 1))
    lib.add(maker("a-dog", 0))
    lib.add(other_model(maker("z-fox", 0)))
    assert [r.name for r in lib.list(maker.fingerprint)] == ["a-dog", "b-cat"]
    by_model = sorted([(maker.fingerprint, 0, "a-dog"), (maker.fingerprint, 1, "b-cat"), ("f" * 16, 0, "z-fox")])
    assert [r.name for r in lib.list()] == [name for *_, name in by_model]
    assert lib.base_models() == {maker.fingerprint: "builtin:tiny", "f" * 16: "other-model"}
    with pytest.raises(ConceptNotFoundError, match="'nope'.*known concepts: a-dog, b-cat, z-fox"):
        lib.get("nope")
    with pytest.raises(ConceptNotFoundError):
        lib.delete("nope")


def test_broken_and_temporary_folders_are_skipped(maker, lib, caplog):
    lib.add(maker("dog", 0))
    (lib.root / "no-json").mkdir()
    (lib.root / "bad-json").mkdir()
    (lib.root / "bad-json" / "concept.json").write_text("{")
    (lib.root / "Upper").mkdir()
    (lib.root / "escape").mkdir()
    meta = json.loads((lib.root / "dog" / "concept.json").read_text())
    (lib.root / "escape" / "concept.json").write_text(json.dumps({**meta, "name": "escape", "adapter": "../dog/x"}))
    (lib.root / ".tmp-cat-abc").mkdir()
    (lib.root / ".gitkeep").write_text("")
    with caplog.at_level(logging.WARNING, logger="spectral_diffusion.library.store"):
        assert [r.name for r in lib.list()] == ["dog"]
    assert "no-json" in caplog.text and "bad-json" in caplog.text and "Upper" in caplog.text
    assert "outside the concept folder" in caplog.text
    with pytest.raises(LibraryError, match="concept folder .*bad-json is broken"):
        lib.get("bad-json")
    with pytest.raises(LibraryError, match="a broken concept folder named 'no-json' is already in the library"):
        lib.add(maker("no-json", 1))
    lib.delete("bad-json")  # a broken folder can still be removed by name
    assert not (lib.root / "bad-json").exists()


# ----- slots ----------------------------------------------------------------------------------------


def test_allocation_freeing_and_reuse(maker, lib):
    fp, cap = maker.fingerprint, maker.capacity(RANK)
    assert cap == 8 and Library.capacity(RANK, 32) == 8
    for expected, name in enumerate(["a", "b", "c"]):
        slot = lib.allocate_slot(fp, RANK, cap)
        assert slot == expected
        lib.add(maker(name, slot))
    assert lib.slot_map(fp) == {0: "a", 1: "b", 2: "c"}
    lib.delete("b")
    assert lib.slot_map(fp) == {0: "a", 2: "c"}
    assert lib.allocate_slot(fp, RANK, cap) == 1  # the freed slot is reused first
    assert lib.allocate_slot("f" * 16, RANK, cap) == 0  # slots are per base model
    report = lib.slot_report(fp, RANK)
    assert report.capacity == 8 and report.free == [1, 3, 4, 5, 6, 7]
    assert json.loads(json.dumps(report.to_json()))["taken"] == {"0": "a", "2": "c"}


def test_explicit_slot(maker, lib):
    fp, cap = maker.fingerprint, maker.capacity(RANK)
    lib.add(maker("dog", 2))
    assert lib.allocate_slot(fp, RANK, cap, requested=5) == 5
    with pytest.raises(
        SlotConflictError,
        match=r"slot 2 is taken by concept 'dog' \(slot 2, rank 4\); free slots: "
        r"\[0, 1, 3, 4, 5, 6, 7\]",
    ):
        lib.allocate_slot(fp, RANK, cap, requested=2)
    with pytest.raises(
        SlotConflictError, match=r"slot 8 does not exist at rank 4: this base model has 8 slots \(0-7\)"
    ):
        lib.allocate_slot(fp, RANK, cap, requested=8)
    with pytest.raises(SlotConflictError, match="taken by concept 'dog'"):
        try_reserve(lib, "cat", fp, RANK, cap, requested=2)


def test_mixed_ranks_use_column_overlap(maker, lib):
    fp = maker.fingerprint
    lib.add(maker("wide", 0, rank=8))  # columns 0-7 = rank-4 slots 0 and 1
    lib.add(maker("thin", 5, rank=2))  # columns 10-11, inside rank-4 slot 2
    assert lib.allocate_slot(fp, 4, maker.capacity(4)) == 3
    assert lib.allocate_slot(fp, 2, maker.capacity(2)) == 4  # columns 8-9 are still free
    assert lib.slot_map(fp, 4) == {0: "wide", 1: "wide", 2: "thin"}
    assert lib.slot_map(fp) == {0: "wide", 1: "wide", 2: "wide", 3: "wide", 5: "thin"}  # unit: smallest rank
    with pytest.raises(SlotConflictError, match="taken by concept 'wide'"):
        lib.allocate_slot(fp, 4, maker.capacity(4), requested=1)
    with pytest.raises(SlotConflictError, match="taken by concept 'thin'"):
        lib.add(maker("clash", 2, rank=4))


def test_capacity_exhaustion(maker, lib):
    fp, cap = maker.fingerprint, maker.capacity(16)
    assert cap == 2
    lib.add(maker("a", 0, rank=16))
    lib.add(maker("b", 1, rank=16))
    # issue 24 item 11: the advice is what helps; a smaller rank is named only where one still fits
    with pytest.raises(SlotConflictError) as full:
        lib.allocate_slot(fp, 16, cap)
    assert str(full.value) == (
        "all 2 slots of rank 16 of this base model are taken; delete a concept you no longer need (list shows "
        "them), or keep further concepts in another library (--library DIR)"
    )
    with pytest.raises(SlotConflictError, match="all 2 slots"):
        try_reserve(lib, "c", fp, 16, cap)
    assert lib.slot_report(fp, 16).free == []
    lib.delete("b")
    lib.add(maker("c", 2, rank=8))  # columns 16-23: rank-16 slot 1 is taken, columns 24-31 are free
    with pytest.raises(
        SlotConflictError,
        match=r"another library \(--library DIR\); a concept of rank 8 or less "
        r"still fits \(--rank 8\)$",
    ):
        lib.allocate_slot(fp, 16, cap)
    assert lib.allocate_slot(fp, 8, maker.capacity(8)) == 3
    with pytest.raises(SlotConflictError, match="no slot of rank 64"):
        lib.allocate_slot(fp, 64, maker.capacity(64))


def test_add_refuses_taken_name_slot_and_token(maker, lib):
    lib.add(maker("dog", 0))
    with pytest.raises(LibraryError, match="'dog' is already in the library"):
        lib.add(maker("dog", 1))
    with pytest.raises(SlotConflictError, match="slot 0 .* taken by concept 'dog'"):
        lib.add(maker("cat", 0))
    cat = maker("cat", 1)
    with pytest.raises(TokenError, match="<dog> is already used by concept 'dog'"):
        lib.add(dataclasses.replace(cat, info=dataclasses.replace(cat.info, tokens=["<dog>"])))
    lib.add(other_model(maker("cat", 0)))  # the same slot of another base model is fine
    record = lib.add(maker("dog", 3, seed=5), overwrite=True)
    assert record.slot == 3 and lib.slot_map(maker.fingerprint) == {3: "dog"}
    assert not [p for p in lib.root.iterdir() if p.name.startswith(".") and p.name != ".library.lock"]


# ----- reservations ---------------------------------------------------------------------------------


def test_reservations_hold_slots_and_names(maker, lib):
    fp, cap = maker.fingerprint, maker.capacity(RANK)
    lib.add(maker("a", 0))
    with lib.reserve("b", fp, RANK, cap, tokens=["<b>"]) as slot_b:
        assert slot_b == 1
        assert lib.allocate_slot(fp, RANK, cap) == 2
        assert lib.slot_report(fp, RANK).reserved == {1: "b"}
        with pytest.raises(LibraryError, match="'b' is already being trained"):
            try_reserve(lib, "b", fp, RANK, cap)
        with pytest.raises(LibraryError, match="'a' is already in the library"):
            try_reserve(lib, "a", fp, RANK, cap)
        with pytest.raises(TokenError, match="<b> is already used"):
            try_reserve(lib, "c", fp, RANK, cap, tokens=["<b>"])
        with pytest.raises(SlotConflictError, match="training of 'b' in progress"):
            lib.add(maker("c", 1))
        lib.add(maker("b", slot_b))  # the reservation's owner may use it
    assert lib.reservations() == []
    assert lib.slot_map(fp) == {0: "a", 1: "b"}
    with pytest.raises(RuntimeError), lib.reserve("c", fp, RANK, cap) as slot_c:
        assert slot_c == 2
        raise RuntimeError("training failed")
    assert lib.reservations() == [] and lib.allocate_slot(fp, RANK, cap) == 2  # nothing leaked
    with lib.reserve("a", fp, RANK, cap, overwrite=True) as slot_a:
        assert slot_a == 0  # a retraining may take back its own slot


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_reservation(lib, name, slot, **changes):
    fields = dict(
        name=name,
        base_fingerprint="fp",
        rank=RANK,
        slot=slot,
        tokens=[],
        pid=dead_pid(),
        pid_start=None,
        host=reservations_module._HOST,
        created=0.0,
        id="x",
    )
    fields.update(changes)
    folder = lib.root / ".reservations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(Reservation.from_json(fields).to_json()))


def test_stale_and_foreign_reservations(lib):
    write_reservation(lib, "dead", 0)
    write_reservation(lib, "remote", 1, host="another-host", created=reservations_module.time.time())
    write_reservation(lib, "old-remote", 2, host="another-host", created=0.0)
    (lib.root / ".reservations" / "garbage.json").write_text("{")
    me = os.getpid()
    write_reservation(lib, "alive", 4, pid=me, pid_start=reservations_module._process_start(me))
    if Path("/proc/self/stat").exists():  # our pid, another start time: a recycled pid
        write_reservation(lib, "recycled", 3, pid=me, pid_start="1")
    assert lib.allocate_slot("fp", RANK, 8) == 0  # dead, recycled and expired ones are ignored
    assert [v.name for v in lib.reservations()] == ["remote", "alive"]
    assert lib.allocate_slot("fp", RANK, 8, requested=3) == 3
    removed = lib.cleanup()
    assert {".reservations/dead.json", ".reservations/garbage.json", ".reservations/old-remote.json"} <= set(removed)
    assert sorted(p.name for p in (lib.root / ".reservations").iterdir()) == ["alive.json", "remote.json"]


# ----- import / export ------------------------------------------------------------------------------


def test_import_export_round_trip(maker, lib, tmp_path):
    lib.add(maker("dog", 0))
    exported = lib.export_file("dog", tmp_path)
    assert exported == tmp_path / "dog.safetensors"
    stored, written = read_adapter(lib.root / "dog" / "adapter.safetensors"), read_adapter(exported)
    torch.testing.assert_close(written.layers, stored.layers, rtol=0, atol=0)
    assert {**stored.metadata(), "image_count": "0"} == written.metadata()  # plus the card (no preview here)
    other = Library(tmp_path / "other")
    record = other.import_file(exported, base_fingerprint=maker.fingerprint)
    assert record.name == "dog" and record.slot == 0 and record.image_count == 0 and record.preview_path is None
    lib.delete("dog")
    renamed = lib.import_file(exported, name="rex")
    assert renamed.name == "rex" and lib.adapter("rex").info.name == "rex"


def test_importing_a_taken_name_says_whether_another_name_would_help(maker, lib, tmp_path):
    """Issue 24 item 11: "pick another name" was wrong advice when the file's own slot (or token) is taken too."""
    lib.add(maker("dog", 0))
    lib.add(maker("cat", 1))
    again = lib.export_file("dog", tmp_path / "again.safetensors")  # the same concept: same slot, same token
    with pytest.raises(LibraryError) as same:
        lib.import_file(again)
    assert str(same.value) == (
        "a concept named 'dog' is already in the library, and another name would not help: slot 0 (rank 4), which "
        "it was trained into, is held by concept 'dog' (slot 0, rank 4); its trigger token <dog> is used by concept "
        "'dog' (an imported adapter keeps its slot and trigger tokens). Delete 'dog' first to import the file, or "
        "import it into another library"
    )
    elsewhere = save_adapter(maker("dog", 1, seed=3), tmp_path / "dog-1.safetensors")  # slot 1 is cat's
    with pytest.raises(LibraryError, match=r"held by concept 'cat' .*Delete 'cat' and 'dog' first"):
        lib.import_file(elsewhere)
    # its own slot and token free: another name is the answer, and works
    loose = maker("dog5", 5, seed=4)
    loose = dataclasses.replace(loose, info=dataclasses.replace(loose.info, name="dog"))
    free = save_adapter(loose, tmp_path / "dog-5.safetensors")
    with pytest.raises(LibraryError, match=r"'dog' is already in the library; import the file under another name"):
        lib.import_file(free)
    assert lib.import_file(free, name="dog-two").slot == 5


def test_a_fused_bundle_imports_all_its_concepts_or_none(maker, lib, tmp_path):
    bundle = write_bundle({"dog": maker("dog", 0), "cat": maker("cat", 1)}, tmp_path / "set.safetensors")
    lib.add(maker("fox", 1))
    before = snapshot(lib.root)
    with pytest.raises(SlotConflictError, match="slot 1 .* taken by concept 'fox'"):
        lib.import_bundle(bundle)  # cat's slot is fox's: dog is not added either
    assert snapshot(lib.root) == before
    lib.delete("fox")
    records = lib.import_bundle(bundle, base_fingerprint=maker.fingerprint)
    assert [(r.name, r.slot) for r in records] == [("dog", 0), ("cat", 1)]
    assert [r.name for r in lib.list()] == ["dog", "cat"]


def bad_files(maker, tmp_path) -> dict[str, tuple[Path, type, str, dict]]:
    good = save_adapter(maker("x", 5), tmp_path / "good.safetensors")
    raw = good.read_bytes()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 300)
    pickled = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(2)}, pickled)
    plain_pickle = tmp_path / "plain-pickle.safetensors"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    other_fp = save_adapter(other_model(maker("other", 0)), tmp_path / "other-fp.safetensors")
    same_slot = save_adapter(maker("intruder", 0), tmp_path / "same-slot.safetensors")
    same_name = save_adapter(maker("dog", 6), tmp_path / "same-name.safetensors")
    return {
        "garbage": (garbage, AdapterFormatError, "not a safetensors file", {}),
        "pickle": (pickled, AdapterFormatError, "not a safetensors file", {}),
        "plain pickle": (plain_pickle, AdapterFormatError, "not a safetensors file", {}),
        "truncated": (truncated, AdapterFormatError, "truncated or corrupt", {}),
        "empty": (empty, AdapterFormatError, "too short", {}),
        "missing": (tmp_path / "nothing.safetensors", AdapterFormatError, "cannot read", {}),
        "other base model": (
            other_fp,
            LibraryError,
            "trained on another base model",
            {"base_fingerprint": maker.fingerprint},
        ),
        "slot taken": (same_slot, SlotConflictError, "slot 0 .* taken by concept 'dog'.*baked.*cannot be moved", {}),
        "name taken": (same_name, LibraryError, "'dog' is already in the library", {}),
        "bad new name": (good, LibraryError, "looks like a path", {"name": "../x"}),
    }


def test_bad_or_foreign_imports_leave_the_library_unchanged(maker, lib, tmp_path):
    lib.add(maker("dog", 0), images=[Image.new("RGB", (8, 8))])
    with lib.reserve("cat", maker.fingerprint, RANK, maker.capacity(RANK)):
        before = snapshot(lib.root)
        for case, (path, error, message, kwargs) in bad_files(maker, tmp_path).items():
            with pytest.raises(error, match=message):
                lib.import_file(path, **kwargs)
            assert snapshot(lib.root) == before, case


def test_another_architecture_is_another_base_model(maker, lib, tmp_path, models_home):
    # same weights, other adapted layers: another fingerprint, hence its own slot map
    wider = SpectralAdapters.from_pipeline(load_pipeline("builtin:tiny"), TargetConfig.preset("attention+ff"))
    wider.new_concept(ConceptInfo("ff-dog", 0, RANK, "rotational", ["<ff-dog>"], "dog"))
    path = save_adapter(adapter_from_model(wider, "ff-dog", "builtin:tiny"), tmp_path / "ff.safetensors")
    lib.add(maker("dog", 0))
    before = snapshot(lib.root)
    with pytest.raises(LibraryError, match="trained on another base model"):
        lib.import_file(path, base_fingerprint=maker.fingerprint)
    assert snapshot(lib.root) == before
    assert lib.import_file(path).slot == 0  # without a model to check against, it simply gets its own map
    assert lib.slot_map(wider.fingerprint) == {0: "ff-dog"} and lib.slot_map(maker.fingerprint) == {0: "dog"}


# ----- crashes, cleanup, locking --------------------------------------------------------------------


def test_crash_during_add_leaves_nothing(maker, lib, monkeypatch):
    lib.add(maker("dog", 0))
    before = snapshot(lib.root)

    def crash(data, path):
        Path(path).write_bytes(b"\0" * 100)  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(records_module, "save_adapter", crash)
    with pytest.raises(OSError, match="No space"):
        lib.add(maker("cat", 1))
    assert snapshot(lib.root) == before
    with pytest.raises(OSError):
        lib.add(maker("dog", 2), overwrite=True)  # a failed overwrite keeps the old concept
    assert snapshot(lib.root) == before and lib.get("dog").slot == 0


def test_cleanup_removes_leftovers_and_restores_interrupted_overwrite(maker, lib):
    lib.add(maker("dog", 0))
    (lib.root / ".tmp-cat-abc").mkdir()
    (lib.root / ".tmp-cat-abc" / "adapter.safetensors").write_bytes(b"\0" * 10)
    (lib.root / ".trash-fox-abc" / "fox").mkdir(parents=True)
    # an overwrite of "dog" killed between its two renames: the old concept sits aside
    (lib.root / ".old-dog-abc").mkdir()
    (lib.root / "dog").rename(lib.root / ".old-dog-abc" / "dog")
    assert lib.list() == []
    reopened = Library(lib.root)  # opening cleans up
    assert [r.name for r in reopened.list()] == ["dog"]
    assert sorted(p.name for p in lib.root.iterdir()) == [".library.lock", "dog"]
    assert reopened.cleanup() == []


def test_busy_library_gives_a_clear_error(maker, tmp_path):
    root = tmp_path / "concepts"
    root.mkdir()
    (root / ".tmp-x-1").mkdir()
    with FileLock(str(root / ".library.lock")):
        lib = Library(root, lock_timeout=0.2)  # opening does not wait for the lock
        assert (root / ".tmp-x-1").exists()
        with pytest.raises(LibraryError, match="is busy: another process held its lock for more than 0.2 s"):
            lib.add(maker("dog", 0))
        assert lib.list() == []  # reading needs no lock
    lib.add(maker("dog", 0))


def test_concurrent_processes_get_distinct_slots(maker, lib, tmp_path):
    files = {slot: str(save_adapter(maker(f"s{slot}", slot), tmp_path / f"s{slot}.safetensors")) for slot in range(8)}
    lib.add(maker("first", 1))  # so the free slots are 0, 2, 3, 4, ...
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    names = [f"proc-{i}" for i in range(4)]
    processes = [
        ctx.Process(
            target=library_worker.reserve_and_add,
            args=(str(lib.root), name, files, RANK, maker.capacity(RANK), barrier, results),
        )
        for name in names
    ]
    for process in processes:
        process.start()
    got = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert all(isinstance(slot, int) for slot in got.values()), got
    assert sorted(got.values()) == [0, 2, 3, 4]
    assert lib.slot_map(maker.fingerprint) == {1: "first", **{slot: name for name, slot in got.items()}}
    for name in names:
        assert lib.adapter(name).info.slot == got[name]
    assert lib.cleanup() == [] and lib.reservations() == []
    assert sorted(p.name for p in lib.root.iterdir() if p.name.startswith(".")) == [".library.lock", ".reservations"]


def test_killed_training_leaks_no_slot(maker, lib, tmp_path):
    path = save_adapter(maker("x", 0), tmp_path / "x.safetensors")
    process = multiprocessing.get_context("spawn").Process(
        target=library_worker.killed_during_add, args=(str(lib.root), "ghost", str(path), RANK, maker.capacity(RANK))
    )
    process.start()
    process.join(timeout=120)
    assert process.exitcode == 9
    leftovers = sorted(p.name for p in lib.root.iterdir())
    assert any(name.startswith(".tmp-ghost-") for name in leftovers)
    assert (lib.root / ".reservations" / "ghost.json").exists()
    assert lib.list() == [] and not lib.exists("ghost")  # the half-written concept is invisible
    assert lib.allocate_slot(maker.fingerprint, RANK, maker.capacity(RANK)) == 0  # its reservation is stale
    Library(lib.root)  # the next opener cleans up
    assert sorted(p.name for p in lib.root.iterdir()) == [".library.lock", ".reservations"]
    assert list((lib.root / ".reservations").iterdir()) == []
    assert lib.import_file(path, name="ghost").slot == 0


def test_export_carries_the_preview_so_an_import_shows_the_same_card(maker, lib, tmp_path):
    preview = Image.new("RGB", (64, 64), (200, 40, 40))
    lib.add(maker("dog", 0), images=[Image.new("RGB", (32, 32))] * 3, preview=preview)
    exported = lib.export_file("dog", tmp_path / "dog.safetensors")
    other = Library(tmp_path / "elsewhere")
    record = other.import_file(exported)
    assert record.image_count == 3 and record.preview_path is not None
    with Image.open(record.preview_path) as shown:
        assert shown.size == (64, 64) and shown.convert("RGB").getpixel((5, 5)) == (200, 40, 40)
    torch.testing.assert_close(other.adapter("dog").layers, lib.adapter("dog").layers, rtol=0, atol=0)


def test_files_get_ordinary_permissions(maker, lib, tmp_path):
    """Atomic writes start from a private temporary file; the result must be an ordinary file (umask)."""
    import os

    lib.add(maker("dog", 0), images=[Image.new("RGB", (32, 32))], preview=Image.new("RGB", (8, 8)))
    exported = lib.export_file("dog", tmp_path / "dog.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    folder = lib.root / "dog"
    for path in [exported, *folder.rglob("*")]:
        if path.is_file():
            assert path.stat().st_mode & 0o777 == expected, path
