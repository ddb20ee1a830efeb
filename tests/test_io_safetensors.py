"""ftjax.io.safetensors: strict reader, streaming writer, byte-exact round trips, every malformed input."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch

from ftjax.errors import FtjaxError
from ftjax.io.safetensors import DTYPES, SafetensorsFile, SafetensorsWriter, TensorInfo, dtype_code


def sample(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes reinterpreted as `code` (covers NaN/inf payloads: the round trip must keep every bit)."""
    dt = DTYPES[code]
    n = int(np.prod(shape)) * dt.itemsize
    raw = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if code == "BOOL":
        raw = raw % 2
    return raw.view(dt).reshape(shape)


ALL = {f"t.{code}.{i}": sample(code, shape, i) for code in DTYPES for i, shape in enumerate([(3, 5), (), (0, 4), (7,)])}


def write(path, tensors: dict[str, np.ndarray], metadata=None):
    infos = [TensorInfo(k, v.dtype, v.shape) for k, v in tensors.items()]
    with SafetensorsWriter(path, infos, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return path


def raw_file(path, header: object, data: bytes = b"", *, header_len: int | None = None):
    """Hand-craft a (possibly bad) safetensors file."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)
    return path


def assert_bytes_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_dtype_table_and_codes():
    assert DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert DTYPES["F8_E5M2"] == np.dtype(ml_dtypes.float8_e5m2)
    for code, dt in DTYPES.items():
        assert dtype_code(dt) == code
    with pytest.raises(FtjaxError, match="complex64"):
        dtype_code(np.complex64)
    with pytest.raises(FtjaxError, match=">f4"):
        dtype_code(np.dtype(">f4"))


def test_round_trip_every_dtype_bit_exact(tmp_path):
    p = write(tmp_path / "a.safetensors", ALL)
    with SafetensorsFile(p) as f:
        assert f.names() == list(ALL)  # written contiguously in order -> file order
        assert f.metadata == {"format": "pt"}
        for k, v in ALL.items():
            got = f.get(k)
            assert_bytes_equal(got, v)
            assert not got.flags.writeable
            assert f.info(k) == TensorInfo(k, v.dtype, v.shape)
        # read then write again: byte-identical file
        again = write(tmp_path / "b.safetensors", {k: f.get(k) for k in f.names()})
    assert again.read_bytes() == p.read_bytes()


def test_header_layout_matches_hf(tmp_path):
    p = write(tmp_path / "a.safetensors", {"x": np.ones(3, np.float32)}, {"format": "pt", "k": "v"})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and len(raw) == 8 + n + 12
    header = raw[8 : 8 + n]
    assert len(header) - len(header.rstrip(b" ")) < 8  # padded with at most 7 spaces
    assert json.loads(header) == {
        "__metadata__": {"format": "pt", "k": "v"},
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
    }


def test_zero_copy_views_and_slices(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    p = write(tmp_path / "a.safetensors", {"x": x})
    f = SafetensorsFile(p)
    full = f.get("x")
    assert not full.flags.owndata and not full.flags.writeable
    rows = f.get_slice("x", (slice(2, 5),))
    assert np.shares_memory(rows, full)
    np.testing.assert_array_equal(rows, x[2:5])
    np.testing.assert_array_equal(f.get_slice("x", (slice(None), 1)), x[:, 1])
    np.testing.assert_array_equal(f.get_slice("x", 3), x[3])
    with pytest.raises(FtjaxError, match="'x'"):
        f.get_slice("x", ([0, 1],))
    with pytest.raises(FtjaxError, match="'x'"):
        f.get_slice("x", (20,))
    f.close()
    np.testing.assert_array_equal(full, x)  # views outlive close()
    with pytest.raises(FtjaxError, match="no tensor named 'y'"):
        f.info("y")


def test_chunked_writes(tmp_path):
    emb = sample("BF16", (10, 6))
    scalar = np.float32(3.5)
    infos = [TensorInfo("emb", emb.dtype, emb.shape), TensorInfo("s", np.float32, ()),
             TensorInfo("e", np.int32, (0, 2))]
    p = tmp_path / "a.safetensors"
    with SafetensorsWriter(p, infos) as w:
        for r in range(0, 10, 3):
            w.write("emb", emb[r : r + 3])
        w.write("s", np.asarray(scalar))  # empty "e" needs no write
    with SafetensorsFile(p) as f:
        assert_bytes_equal(f.get("emb"), emb)
        assert f.get("s").shape == () and f.get("s") == scalar
        assert f.get("e").shape == (0, 2)


@pytest.mark.parametrize(
    "action, match",
    [
        (lambda w: w.write("b", np.zeros(2, np.float32)), "expected tensor 'a' next"),
        (lambda w: w.write("a", np.zeros(4, np.float64)), "'a' has dtype float32"),
        (lambda w: w.write("a", np.zeros((2, 1), np.float32)), r"'a' has shape \[4\]"),
        (lambda w: [w.write("a", np.zeros(3, np.float32)), w.write("a", np.zeros(2, np.float32))], "after 3 rows"),
        (lambda w: w.write("a", np.zeros(4, np.float32)) or w.close(), "incomplete: tensor 'b'"),
    ],
)
def test_writer_rejects_bad_chunks_and_removes_partial_file(tmp_path, action, match):
    p = tmp_path / "w.safetensors"
    infos = [TensorInfo("a", np.float32, (4,)), TensorInfo("b", np.float32, (2,))]
    with pytest.raises(FtjaxError, match=match) as e:
        with SafetensorsWriter(p, infos) as w:
            action(w)
    assert str(p) in str(e.value)
    assert not p.exists()


def test_writer_rejects_bad_infos(tmp_path):
    with pytest.raises(FtjaxError, match="complex"):
        SafetensorsWriter(tmp_path / "a.safetensors", [TensorInfo("a", np.complex64, (2,))])
    with pytest.raises(FtjaxError, match="duplicated"):
        SafetensorsWriter(tmp_path / "a.safetensors", [TensorInfo("a", np.float32, (2,))] * 2)


def test_interop_with_safetensors_library(tmp_path):
    # ours -> library (its numpy backend cannot build F8 arrays, so those go through torch below)
    plain = {k: v for k, v in ALL.items() if not k.startswith("t.F8")}
    ours = write(tmp_path / "ours.safetensors", plain)
    loaded = safetensors_numpy.load_file(str(ours))
    assert set(loaded) == set(plain)
    for k, v in loaded.items():
        assert_bytes_equal(v, plain[k])
    from safetensors.torch import load_file

    loaded = load_file(str(write(tmp_path / "all.safetensors", ALL)))
    assert set(loaded) == set(ALL)
    for k, t in loaded.items():
        assert t.shape == ALL[k].shape
        assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == ALL[k].tobytes()
    # same header layout and padding as the library: a one-tensor file is byte-identical
    x = {"x": sample("BF16", (3, 5))}
    safetensors_numpy.save_file(x, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    assert write(tmp_path / "x.safetensors", x).read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    # library -> ours
    theirs = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file(plain, str(theirs), metadata={"format": "np"})
    with SafetensorsFile(theirs) as f:
        assert f.metadata == {"format": "np"} and set(f.names()) == set(plain)
        for k, v in plain.items():
            assert_bytes_equal(f.get(k), v)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header, data, header_len, match",
    [
        (b"", b"", 1 << 40, "over the 100000000-byte limit"),
        (b"{}", b"", 4096, "header length 4096 is larger than the file"),
        (b"{not json", b"", None, "header is not valid JSON"),
        (b"\xff\xfe", b"", None, "header is not valid JSON"),
        (b'{"a": 1, "a": 2}', b"", None, "duplicate key 'a'"),
        ([1, 2], b"", None, "header is a JSON list"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "tensor 'w': header entry must"),
        ({"w": [1]}, b"", None, "tensor 'w': header entry must"),
        ({"w": {**F32_2, "dtype": "F4"}}, b"\0" * 8, None, "tensor 'w': unknown dtype 'F4'"),
        ({"w": {**F32_2, "shape": [-2]}}, b"\0" * 8, None, "tensor 'w': shape"),
        ({"w": {**F32_2, "shape": "2"}}, b"\0" * 8, None, "tensor 'w': shape"),
        ({"w": {**F32_2, "data_offsets": [0]}}, b"\0" * 8, None, "tensor 'w': data_offsets"),
        ({"w": {**F32_2, "data_offsets": [8, 0]}}, b"\0" * 8, None, "tensor 'w': data_offsets end 0 is before begin 8"),
        ({"w": {**F32_2, "data_offsets": [0, 12]}}, b"\0" * 12, None, r"tensor 'w'.*span 12 bytes but F32\[2\] needs 8"),
        ({"w": {**F32_2, "data_offsets": [8, 16]}}, b"\0" * 8, None, "tensor 'w'.*outside the file.*truncated"),
        ({"w": F32_2}, b"\0" * 5, None, "tensor 'w'.*outside the file.*truncated"),
        (
            {"w": F32_2, "v": {"dtype": "I32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
            None,
            "tensor 'v' overlaps tensor 'w'",
        ),
    ],
)
def test_malformed_files_name_file_and_tensor(tmp_path, header, data, header_len, match):
    p = raw_file(tmp_path / "bad.safetensors", header, data, header_len=header_len)
    with pytest.raises(FtjaxError, match=match) as e:
        SafetensorsFile(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg


@pytest.mark.parametrize("size", [0, 5])
def test_too_short_file(tmp_path, size):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\0" * size)
    with pytest.raises(FtjaxError, match=f"{p}: file is only {size} bytes"):
        SafetensorsFile(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FtjaxError, match="not found"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(FtjaxError, match="is a directory"):
        SafetensorsFile(tmp_path)


def test_empty_tensor_may_share_an_offset(tmp_path):
    header = {"w": F32_2, "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}
    p = raw_file(tmp_path / "ok.safetensors", header, np.arange(2, dtype=np.float32).tobytes())
    with SafetensorsFile(p) as f:
        assert f.names() == ["w", "e"]
        assert f.get("e").shape == (0,)
        np.testing.assert_array_equal(f.get("w"), [0.0, 1.0])
