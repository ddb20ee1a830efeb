"""A small, strict reader and streaming writer for the safetensors format.

Format: 8-byte little-endian u64 header length N, then N bytes of UTF-8 JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer. Offsets are relative to the start of the data buffer (byte 8 + N).

Why our own code rather than the `safetensors` package:
- validation: every malformed input becomes a one-line FtjaxError naming the file and the tensor
  (truncation, overlapping ranges, size/dtype mismatch, unknown dtype), not a Rust panic string;
- zero-copy reads: `get` / `get_slice` return read-only numpy views on one mmap of the file, so a
  per-device row slice of a huge embedding touches only those pages (`safetensors.numpy` copies);
- streaming writes: `SafetensorsWriter` writes the header from the TensorInfo list first and then
  tensors (or row chunks of them) one after another, so a shard is never held in memory
  (`safetensors.numpy.save_file` needs the whole dict of arrays at once);
- dtypes: BF16 and the F8 types map to ml_dtypes (the numpy backend of `safetensors` cannot load F8).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes  # must be imported before any BF16/F8 read: provides the numpy dtypes
import numpy as np

from ftjax.errors import FtjaxError

MAX_HEADER_BYTES = 100 * 1000 * 1000  # same cap as the reference implementation

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES: dict[np.dtype, str] = {dt: code for code, dt in DTYPES.items()}


def dtype_code(dtype: Any) -> str:
    """The safetensors dtype code ("BF16", "F32", ...) of a numpy dtype; FtjaxError if unsupported."""
    dt = np.dtype(dtype)
    code = _CODES.get(dt)
    if code is None:
        raise FtjaxError(
            f"dtype {dt.str} ({dt.name}) cannot be stored in safetensors; "
            f"supported: {', '.join(sorted(DTYPES))} (little-endian)"
        )
    return code


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one stored tensor."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        """Size of the tensor data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_uint_list(x: Any, length: int | None = None) -> bool:
    return (
        isinstance(x, list)
        and (length is None or len(x) == length)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in x)
    )


class SafetensorsFile:
    """One safetensors file, header validated on open, tensors read lazily as read-only mmap views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise FtjaxError(f"{self.path}: file is only {size} bytes; not a safetensors file (truncated?)")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES:
                    raise FtjaxError(
                        f"{self.path}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit; "
                        "not a safetensors file or corrupt"
                    )
                if 8 + n > size:
                    raise FtjaxError(
                        f"{self.path}: header length {n} is larger than the file ({size} bytes); truncated or corrupt"
                    )
                raw = f.read(n)
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise FtjaxError(f"{self.path}: safetensors file not found") from None
        except IsADirectoryError:
            raise FtjaxError(f"{self.path}: is a directory, expected a safetensors file") from None
        except PermissionError:
            raise FtjaxError(f"{self.path}: permission denied") from None
        self._data_start = 8 + n
        self.metadata, self._infos, self._offsets = self._parse_header(raw, size - self._data_start)
        # File order: by begin offset (then name, for empty tensors sharing an offset).
        self._names = sorted(self._infos, key=lambda k: (self._offsets[k][0], self._offsets[k][1], k))

    def _parse_header(
        self, raw: bytes, data_size: int
    ) -> tuple[dict[str, str], dict[str, TensorInfo], dict[str, tuple[int, int]]]:
        where = f"{self.path}:"
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise FtjaxError(f"{where} header is not valid JSON ({e}); corrupt or not a safetensors file") from None
        if not isinstance(header, dict):
            raise FtjaxError(f"{where} header is a JSON {type(header).__name__}, expected an object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise FtjaxError(f"{where} __metadata__ must be an object of string values")
        infos: dict[str, TensorInfo] = {}
        offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            t = f"{where} tensor {name!r}"
            if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
                raise FtjaxError(f"{t}: header entry must be an object with dtype, shape and data_offsets")
            code, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(code, str) or code not in DTYPES:
                raise FtjaxError(f"{t}: unknown dtype {code!r}; supported: {', '.join(sorted(DTYPES))}")
            if not _is_uint_list(shape):
                raise FtjaxError(f"{t}: shape {shape!r} is not a list of non-negative integers")
            if not _is_uint_list(offs, 2):
                raise FtjaxError(f"{t}: data_offsets {offs!r} is not a pair of non-negative integers")
            begin, end = offs
            if end < begin:
                raise FtjaxError(f"{t}: data_offsets end {end} is before begin {begin}")
            info = TensorInfo(name, DTYPES[code], tuple(shape))
            if end - begin != info.nbytes:
                raise FtjaxError(
                    f"{t}: data_offsets [{begin}, {end}] span {end - begin} bytes but {code}{list(shape)} "
                    f"needs {info.nbytes}"
                )
            if end > data_size:
                raise FtjaxError(
                    f"{t}: data_offsets [{begin}, {end}] lie outside the file (data region is {data_size} bytes); "
                    "file is truncated or corrupt"
                )
            infos[name], offsets[name] = info, (begin, end)
        prev_name, prev_end = None, 0
        for name in sorted((k for k in offsets if offsets[k][1] > offsets[k][0]), key=lambda k: offsets[k]):
            begin, end = offsets[name]
            if begin < prev_end:
                raise FtjaxError(f"{where} tensor {name!r} overlaps tensor {prev_name!r} (bytes {begin}..{prev_end})")
            prev_name, prev_end = name, end
        return metadata, infos, offsets

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name`: this one (the reader protocol HFCheckpoint shares)."""
        return self.path

    def names(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        """TensorInfo of `name`; FtjaxError if absent."""
        try:
            return self._infos[name]
        except KeyError:
            raise FtjaxError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        """The whole tensor as a read-only, zero-copy view on the memory-mapped file."""
        info = self.info(name)
        if self._mm is None:
            raise FtjaxError(f"{self.path}: file is closed")
        begin, _ = self._offsets[name]
        count = math.prod(info.shape)
        if count == 0:  # mmap of a zero-length region is not allowed; nothing to share anyway
            arr = np.empty(info.shape, info.dtype)
            arr.flags.writeable = False
            return arr
        arr = np.frombuffer(self._mm, dtype=info.dtype, count=count, offset=self._data_start + begin)
        return arr.reshape(info.shape)

    def get_slice(self, name: str, index: Any) -> np.ndarray:
        """A basic-indexing view (ints / slices / Ellipsis, e.g. `(slice(0, 128),)` for rows); no copy."""
        index = index if isinstance(index, tuple) else (index,)
        for item in index:
            if not (item is Ellipsis or isinstance(item, (slice, int, np.integer))):
                raise FtjaxError(f"{self.path}: tensor {name!r}: index {item!r} is not an int or slice")
        try:
            return self.get(name)[index]
        except IndexError as e:
            raise FtjaxError(f"{self.path}: tensor {name!r} shape {list(self.info(name).shape)}: {e}") from None

    def close(self) -> None:
        """Drop the mapping; views handed out stay valid (they keep the mapping alive)."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still exported: the mapping is freed when they die
                pass
            self._mm = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._infos)} tensors)"


def build_header(infos: Sequence[TensorInfo], metadata: dict[str, str] | None) -> bytes:
    """JSON header bytes for `infos` stored contiguously in order, space-padded so 8 + len is a multiple of 8."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FtjaxError(f"safetensors metadata must map str to str, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in infos:
        if info.name == "__metadata__" or info.name in header:
            raise FtjaxError(f"tensor name {info.name!r} is reserved or duplicated")
        if any(d < 0 for d in info.shape):
            raise FtjaxError(f"tensor {info.name!r}: negative dimension in shape {list(info.shape)}")
        header[info.name] = {
            "dtype": dtype_code(info.dtype),
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


class SafetensorsWriter:
    """Streams tensors into a safetensors file: header first, then data in the order of `infos`.

    `write(name, array)` may be called several times per tensor with consecutive leading-axis row
    chunks. `close()` checks that every tensor was fully written and fsyncs. As a context manager,
    the partial file is removed if the block raises. A full disk raises FtjaxError naming the file.
    """

    def __init__(self, path: str | os.PathLike, infos: Sequence[TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.infos = list(infos)
        header = build_header(self.infos, {"format": "pt"} if metadata is None else metadata)
        self._idx = 0  # index of the tensor being written
        self._rows = 0  # rows of it written so far (0-d tensors count as one row)
        self._f = self._io(lambda: open(self.path, "wb"))
        try:
            self._io(lambda: self._f.write(struct.pack("<Q", len(header)) + header))
        except FtjaxError:
            self.abort()
            raise

    def _io(self, fn: Any) -> Any:
        try:
            return fn()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise FtjaxError(f"no space left on device while writing {self.path}") from None
            raise FtjaxError(f"{self.path}: cannot write: {e.strerror or e}") from None

    def _total_rows(self, info: TensorInfo) -> int:
        return info.shape[0] if info.shape else 1

    def _skip_empty(self, name: str | None) -> None:
        # Tensors with no rows (leading dim 0) may be skipped: they need no write() call.
        while (
            self._idx < len(self.infos)
            and self.infos[self._idx].name != name
            and self._total_rows(self.infos[self._idx]) == 0
        ):
            self._idx += 1

    def write(self, name: str, array: Any) -> None:
        """Append `array` (the whole tensor or its next row chunk) to tensor `name`."""
        if self._f is None:
            raise FtjaxError(f"{self.path}: writer is closed")
        self._skip_empty(name)
        if self._idx >= len(self.infos):
            raise FtjaxError(f"{self.path}: tensor {name!r} written after all tensors were complete")
        info = self.infos[self._idx]
        if name != info.name:
            raise FtjaxError(f"{self.path}: expected tensor {info.name!r} next (order of infos), got {name!r}")
        arr = np.asarray(array)
        if arr.dtype != info.dtype:
            raise FtjaxError(f"{self.path}: tensor {name!r} has dtype {info.dtype}, got a chunk of {arr.dtype}")
        if info.shape == ():
            ok, rows = arr.shape == (), 1
        else:
            ok, rows = arr.ndim == len(info.shape) and arr.shape[1:] == info.shape[1:], arr.shape[0] if arr.ndim else 0
        if not ok or self._rows + rows > self._total_rows(info):
            raise FtjaxError(
                f"{self.path}: tensor {name!r} has shape {list(info.shape)}, got a chunk of shape {list(arr.shape)} "
                f"after {self._rows} rows"
            )
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        self._io(lambda: self._f.write(data.data))
        self._rows += rows
        if self._rows == self._total_rows(info):
            self._idx, self._rows = self._idx + 1, 0

    def close(self) -> None:
        """Check that every tensor was completely written, flush and fsync."""
        if self._f is None:
            return
        self._skip_empty(None)
        if self._idx < len(self.infos):
            info = self.infos[self._idx]
            self.abort()
            raise FtjaxError(
                f"{self.path}: incomplete: tensor {info.name!r} has {self._rows} of {self._total_rows(info)} rows"
            )
        try:
            self._io(self._f.flush)
            self._io(lambda: os.fsync(self._f.fileno()))
        except BaseException:
            self.abort()
            raise
        f, self._f = self._f, None
        f.close()

    def abort(self) -> None:
        """Close without checks and remove the partial file."""
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:
                pass
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
