"""Damaged adapter files, shared by the fuzz tests (tests/test_fuzz_adapter.py) and ``python -m
bench.reliability.run fuzz``: each mutator takes a ``random.Random`` (hypothesis-driven or seeded) and
the bytes of a valid safetensors file and returns damaged bytes.
"""

from __future__ import annotations

import json
import math
import random
import struct

import torch

HOSTILE_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**31,
    2**63,
    2**64 + 1,
    -(2**63),
    float("nan"),
    float("inf"),
    "",
    "F32",
    "x" * 300,
    [],
    {},
    [1],
    [[1]],
    ["a"],
    [-1, 4],
    [2**40, 2**40],
    [1.0, 4.0],
    {"a": 1},
    [None],
]
HOSTILE_STRINGS = [
    "",
    " ",
    "abc",
    "-1",
    "0",
    "1",
    "2",
    "4",
    "8",
    "999999",
    "1000001",
    "1e9",
    "4.0",
    " 4",
    "nan",
    "inf",
    "null",
    "[]",
    "{}",
    "[1]",
    '["<ok>"]',
    '["bad token"]',
    '["<a>", "<a>"]',
    '"text"',
    "{",
    "additive",
    "rotational",
    "spectral-adapter",
    "../evil",
    "a/b",
    "x" * 5000,
    "é",
    "\x00",
    "<x>",
    '{"a": 1}',
    "[" * 5000,
    '{"unet": ["to_q"]}',
    "2024-01-01T00:00:00+00:00",
    "[" * 5000 + "]" * 5000,
    '{"a":' * 3000 + "1" + "}" * 3000,
]
JSON_AND_NUMBER_KEYS = ["tokens", "targets", "train_config", "rank", "slot", "variant", "format_version", "name"]
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "", "f32", None, 4]


# ----- the mutators --------------------------------------------------------------------------------


def split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data


def tensor_keys(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def random_bytes(rng: random.Random, raw: bytes) -> bytes:
    body = rng.randbytes(rng.randint(0, 2048))
    choice = rng.randrange(4)
    if choice == 0:
        return body
    if choice == 1:  # a plausible length prefix in front of garbage
        return struct.pack("<Q", rng.randint(0, len(body) + 16)) + body
    if choice == 2:  # a JSON-looking header of garbage
        text = b'{"__metadata__": {"format": "spectral-adapter"}, ' + body
        return struct.pack("<Q", len(text)) + text
    return raw[: 8 + rng.randint(0, 64)] + body  # the start of a real file, then garbage


def truncated(rng: random.Random, raw: bytes) -> bytes:
    return raw[: rng.randrange(len(raw))]


def bit_flipped(rng: random.Random, raw: bytes) -> bytes:
    buffer = bytearray(raw)
    (length,) = struct.unpack("<Q", raw[:8])
    for _ in range(rng.randint(1, 8)):
        # most flips land in the length and header, where they change meaning; some in the data
        end = 8 + length if rng.random() < 0.7 else len(raw)
        position = rng.randrange(end)
        buffer[position] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def _other_shape(rng: random.Random, shape: list[int]) -> list:
    numel = math.prod(shape)
    options = [
        list(reversed(shape)),  # transposed: same size, passes the offsets check
        [numel],  # flattened
        shape + [1],
        [1] + shape,
        [0] + shape[1:],
        [rng.randint(0, 64) for _ in range(rng.randint(0, 4))],
        [2**31 - 1, 2**31 - 1],  # a huge declared size
        [2**30] * 4,
        [2**62],
    ]
    return rng.choice(options)


def header_mangled(rng: random.Random, raw: bytes) -> bytes:
    header, data = split(raw)
    keys = tensor_keys(header)
    key = rng.choice(keys)
    entry = header[key]
    op = rng.randrange(12)
    if op == 0:
        entry["shape"] = _other_shape(rng, entry["shape"])
    elif op == 1:
        entry["shape"] = rng.choice(HOSTILE_VALUES)
    elif op == 2:
        entry["dtype"] = rng.choice(DTYPES)
    elif op == 3:
        start, stop = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [
                [start, stop + rng.randint(1, 64)],
                [start - 4, stop - 4],
                [stop, start],
                [0, len(data) + 8],
                [start, 2**64 - 1],
                [2**63, 2**63 + stop - start],
                rng.choice(HOSTILE_VALUES),
            ]
        )
    elif op == 4:
        del entry[rng.choice(sorted(entry))]
    elif op == 5:
        header[key] = rng.choice(HOSTILE_VALUES)
    elif op == 6:
        del header[key]
    elif op == 7:  # renamed: unknown component, unknown part, or another layer
        prefix, _, part = key.rpartition(".")
        new = rng.choice(
            [
                f"vae.{key}",
                f"{prefix}.W",
                f"{prefix}.G_U",
                key.replace("0", "9", 1),
                "token_embeddings",
                f"{key.split('.', 1)[0]}.token_embeddings",
            ]
        )
        header[new] = header.pop(key)
    elif op == 8:  # the whole header is not an object
        return join(rng.choice(HOSTILE_VALUES), data)
    elif op == 9:  # two same-size tensors swap their bytes: still a valid file
        same = [k for k in keys if header[k]["shape"] == entry["shape"] and k != key]
        if same:
            other = rng.choice(same)
            entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    elif op == 10:  # many extra zero-size tensors
        for i in range(rng.randint(1, 2000)):
            header[f"unet.extra{i}.A"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}
    else:  # the declared header length lies
        text = json.dumps(header).encode()
        lie = rng.choice([0, 1, len(text) - 1, len(text) + 1, len(text) + len(data), 2**32, 2**63 - 1, 2**64 - 1])
        return struct.pack("<Q", lie) + text + data
    return join(header, data)


def metadata_mangled(rng: random.Random, raw: bytes) -> bytes:
    header, data = split(raw)
    meta = header["__metadata__"]
    # half the time one of the parsed fields (JSON or numbers), where a bad value needs handling
    key = rng.choice(JSON_AND_NUMBER_KEYS) if rng.random() < 0.5 else rng.choice(sorted(meta) + ["extra"])
    op = rng.randrange(6)
    if op == 0:
        meta[key] = rng.choice(HOSTILE_VALUES)  # not a string: safetensors metadata is str -> str
    elif op in (1, 2):
        meta[key] = rng.choice(HOSTILE_STRINGS)
    elif op == 3:
        meta.pop(key, None)
    elif op == 4:
        header["__metadata__"] = rng.choice(HOSTILE_VALUES)
    else:
        for i in range(rng.randint(1, 500)):
            meta[f"extra-{i}"] = rng.choice(HOSTILE_STRINGS)
    return join(header, data)


def data_mangled(rng: random.Random, raw: bytes) -> bytes:
    header, data = split(raw)
    key = rng.choice(tensor_keys(header))
    start, stop = header[key]["data_offsets"]
    buffer = bytearray(data)
    value = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, -0.0, 3.0])
    offset = start + 4 * rng.randrange(max((stop - start) // 4, 1))
    if stop > start:
        buffer[offset : offset + 4] = struct.pack("<f", value)
    return join(header, bytes(buffer))


MUTATORS = {
    "random bytes": random_bytes,
    "truncated": truncated,
    "bit flips": bit_flipped,
    "header/shape mangled": header_mangled,
    "metadata mangled": metadata_mangled,
    "tensor data mangled": data_mangled,
}


# ----- checks ---------------------------------------------------------------------------------------


def check_accepted(data) -> None:
    """A file the reader accepts is internally consistent."""
    rank = data.info.rank
    assert data.layers
    for parts in data.layers.values():
        assert parts["c"].shape == (rank,) and parts["s"].shape == (rank,)
        assert parts["U"].shape[1] == rank and parts["V"].shape[1] == rank
        for tensor in parts.values():
            assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
