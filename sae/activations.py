"""Activation files: an uncompressed .npz written as a stream, and a reader that memory-maps it.

Layout of `activations_layer{L}.npz` (plain `np.load(path)` reads it with allow_pickle=False):
    activations   (N_tokens, d)  float16 by default; example i is rows offsets[i]:offsets[i+1]
    offsets       (N_examples+1,) int64
    token_ids     (N_tokens,)     int32
    token_role    (N_tokens,)     int8, see ROLE_*
    example_index (N_examples,)   int64, 0-based line of the example in the dataset file
    labels        (N_examples,)   unicode, only when the dataset has labels
    meta          ()              JSON string: model, layer, dtypes, dataset hash, counts, config

`activations.npy` is the zip's first member and is written with sizes known up front, so rows can be
appended window by window and the file resumed after a crash: the partial file holds the zip local
header, the .npy header and the rows so far; `state()` gives the byte count and running CRC-32 to
persist. `finish()` patches the CRC, appends the small members and the central directory (zip64),
then renames the partial file to its final name, so a finished-looking file is always complete.
np.load cannot memory-map inside an .npz; `open_activations` finds the member's data offset and does.
"""
import io
import json
import os
import struct
import threading
import zipfile
import zlib

import numpy as np

ROLE_SPECIAL, ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = 0, 1, 2, 3
ROLE_NAMES = {"special": ROLE_SPECIAL, "system": ROLE_SYSTEM, "user": ROLE_USER,
              "assistant": ROLE_ASSISTANT}
REQUIRED_KEYS = ("activations", "offsets", "token_ids", "token_role", "example_index", "meta")

_DOS_TIME, _DOS_DATE = 0, (2020 - 1980) << 9 | 1 << 5 | 1  # fixed timestamp: identical runs, identical bytes
_U32 = 0xFFFFFFFF


def _local_header(name: bytes, size: int, crc: int) -> bytes:
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size)  # zip64: uncompressed, compressed size
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, _DOS_TIME, _DOS_DATE, crc, _U32, _U32,
                       len(name), len(extra)) + name + extra


def _central_header(name: bytes, size: int, crc: int, offset: int) -> bytes:
    extra = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset)
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, _DOS_TIME, _DOS_DATE, crc,
                       _U32, _U32, len(name), len(extra), 0, 0, 0, 0, _U32) + name + extra


def _npy_header(shape: tuple, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def crc_of_range(fd: int, start: int, size: int, chunk_bytes: int = 1 << 24) -> int:
    """CRC-32 of `size` bytes of an open file from `start`, read in chunks with pread."""
    crc = 0
    for at in range(0, size, chunk_bytes):
        crc = zlib.crc32(os.pread(fd, min(chunk_bytes, size - at), start + at), crc)
    return crc


class ResumeMismatch(Exception):
    """A partial file that does not hold the rows its saved state counts."""


class StreamingNpzWriter:
    """Append rows of one big array to `final_path + ".partial"`, then add small arrays and rename."""

    def __init__(self, final_path: str, shape: tuple, dtype, state: dict | None = None):
        self.final_path, self.partial_path = final_path, final_path + ".partial"
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self.npy_header = _npy_header(self.shape, self.dtype)
        self.member_size = len(self.npy_header) + self.shape[0] * self.row_bytes
        self.header = _local_header(b"activations.npy", self.member_size, 0)
        self.data_start = len(self.header) + len(self.npy_header)
        if state is None:
            self.f = open(self.partial_path, "wb")
            self.f.write(self.header + self.npy_header)
            self.crc, self.rows = zlib.crc32(self.npy_header), 0
        else:  # resume: check the rows the saved state counts, drop whatever was written after them
            self.f = open(self.partial_path, "r+b")
            self.rows, self.crc = state["rows"], state["crc"]
            end = self.data_start + self.rows * self.row_bytes  # the member's bytes (npy header, rows) end there
            if (os.path.getsize(self.partial_path) < end
                    or crc_of_range(self.f.fileno(), len(self.header), end - len(self.header)) != self.crc):
                self.f.close()
                raise ResumeMismatch(f"{self.partial_path} does not hold the {self.rows} rows its saved state "
                                     f"counts (the machine stopped before they reached the disk?)")
            self.f.truncate(end)
            self.f.seek(0, os.SEEK_END)

    def append(self, rows: np.ndarray):
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        assert rows.shape[1:] == self.shape[1:], f"row shape {rows.shape[1:]} != {self.shape[1:]}"
        assert self.rows + len(rows) <= self.shape[0], "more rows than the declared shape"
        data = memoryview(rows.reshape(-1)).cast("B")  # no copy
        self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.rows += len(rows)

    def state(self) -> dict:
        """Hand the rows to the operating system and return what a later run needs to resume from here.
        No fsync (it would make extraction wait for the disk after every window): a process that is killed
        loses nothing, and after a machine crash the resume finds the rows' CRC wrong and starts over."""
        self.f.flush()
        return {"rows": self.rows, "crc": self.crc}

    def finish(self, offsets, token_ids, token_role, example_index, meta: dict, labels=None):
        """Write the small arrays of the format (the one place that lists them and their types) and the zip
        directory, then rename to the final path. offsets: (N + 1) row where each example starts, then the
        row count; token_ids and token_role (ROLE_* codes): per row; example_index: each example's line in
        the dataset; meta: JSON-able description (model, layer, dataset, its provenance record); labels:
        per example, or None."""
        assert self.rows == self.shape[0], f"wrote {self.rows} of {self.shape[0]} rows"
        arrays = {"offsets": np.asarray(offsets, dtype=np.int64), "token_ids": np.asarray(token_ids, dtype=np.int32),
                  "token_role": np.asarray(token_role, dtype=np.int8),
                  "example_index": np.asarray(example_index, dtype=np.int64), "meta": np.array(json.dumps(meta))}
        if labels is not None:
            arrays["labels"] = np.asarray(labels, dtype=str)
        self.f.seek(14)  # CRC-32 field of the local header
        self.f.write(struct.pack("<I", self.crc))
        self.f.seek(0, os.SEEK_END)
        entries = [(b"activations.npy", self.member_size, self.crc, 0)]
        for key, array in arrays.items():
            data, name = _npy_bytes(np.asarray(array)), f"{key}.npy".encode()
            crc, offset = zlib.crc32(data), self.f.tell()
            self.f.write(_local_header(name, len(data), crc) + data)
            entries.append((name, len(data), crc, offset))
        cd_offset = self.f.tell()
        central = b"".join(_central_header(*e) for e in entries)
        eocd64_offset = cd_offset + len(central)
        n = len(entries)
        self.f.write(central
                     + struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
                     + struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
                     + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, min(len(central), _U32), _U32, 0))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.partial_path, self.final_path)

    def close(self):
        self.f.close()


def examples_between(arrays: dict, a: int, b: int) -> dict:
    """The small arrays of examples a:b (offsets, token_ids, token_role, example_index, labels or None, as
    StreamingNpzWriter.finish takes them), offsets counted from example a."""
    start, stop = int(arrays["offsets"][a]), int(arrays["offsets"][b])
    return {"offsets": arrays["offsets"][a:b + 1] - start, "token_ids": arrays["token_ids"][start:stop],
            "token_role": arrays["token_role"][start:stop], "example_index": arrays["example_index"][a:b],
            "labels": None if arrays["labels"] is None else arrays["labels"][a:b]}


class ActivationFileError(Exception):
    """The file is missing, truncated or not an activations file; the message says which."""


def _data_start(f, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's bytes (after its local header)."""
    f.seek(info.header_offset)
    name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _member_memmap(f, path: str, info: zipfile.ZipInfo) -> np.ndarray:
    """Memory-map one stored .npy member of the zip (a 0-d or unicode member is read instead)."""
    start = _data_start(f, info)
    f.seek(start)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"member {info.filename} is not a C-ordered plain array")
    if not shape or dtype.kind == "U":
        f.seek(start)
        return np.lib.format.read_array(f, allow_pickle=False)
    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)


def _read_at(fd: int, buffer: memoryview, offset: int, lock: threading.Lock, preadv=getattr(os, "preadv", None)) -> int:
    """Read len(buffer) bytes at `offset` into buffer; the number read. preadv where it exists (safe from several
    threads at once); elsewhere (Windows) a seek and reads under `lock`."""
    if preadv is not None:
        return preadv(fd, [buffer], offset)
    with lock:
        os.lseek(fd, offset, os.SEEK_SET)
        done = 0
        while done < len(buffer):
            chunk = os.read(fd, min(len(buffer) - done, 1 << 30))
            if not chunk:
                break
            buffer[done:done + len(chunk)] = chunk
            done += len(chunk)
        return done


class Activations:
    """Read-only view of an activations .npz; `activations` is an np.memmap, nothing big is loaded."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise ActivationFileError(f"activations file {path} does not exist; run extract_activations.py "
                                      f"first or set ACTIVATIONS_PATH to an existing file")
        try:
            with zipfile.ZipFile(path) as zf:
                infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
            missing = [k for k in REQUIRED_KEYS if k not in infos]
            if missing:
                raise ActivationFileError(f"{path} lacks {', '.join(missing)}; it is not an activations "
                                          f"file of this project, re-run extract_activations.py")
            if any(i.compress_type != zipfile.ZIP_STORED for i in infos.values()):
                raise ActivationFileError(f"{path} is compressed; activations must be stored uncompressed "
                                          f"to be memory-mapped, re-run extract_activations.py")
            with open(path, "rb") as f:
                members = {k: _member_memmap(f, path, info) for k, info in infos.items()}
                self._spans = {info.filename: (_data_start(f, info), info.file_size, info.CRC) for info in infos.values()}
            self.offsets = np.asarray(members["offsets"])
            self.example_index = np.asarray(members["example_index"])
            self.token_ids, self.token_role = members["token_ids"], members["token_role"]
            self.labels = np.asarray(members["labels"]) if "labels" in members else None
            self.meta = json.loads(str(members["meta"]))
        except (zipfile.BadZipFile, EOFError, ValueError, struct.error, OSError) as e:
            raise ActivationFileError(f"{path} is truncated or corrupt ({e}); delete it and re-run "
                                      f"extract_activations.py") from None
        self.activations = members["activations"]
        if self.activations.ndim != 2 or self.activations.shape[0] != self.offsets[-1] or \
                len(self.token_ids) != self.offsets[-1]:
            raise ActivationFileError(f"{path} has activations of shape {self.activations.shape} that do not "
                                      f"match its offsets; re-run extract_activations.py")
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # for read_rows
        self._seek_lock = threading.Lock()  # where there is no preadv (Windows): seek and read under a lock

    def verify(self, chunk_bytes: int = 1 << 24):
        """Check every member against the CRC-32 the zip stores for it (the whole file is read once, about
        a second per GB); raise ActivationFileError naming the member that fails."""
        for name, (start, size, crc) in self._spans.items():
            if crc_of_range(self._fd, start, size, chunk_bytes) != crc:
                raise ActivationFileError(f"{self.path} is corrupt: {name} fails its CRC-32 check (the bytes on "
                                          f"disk changed after extraction); delete it and re-run extract_activations.py")

    def __del__(self, _close=os.close):  # bound now: at interpreter exit the os module may be gone
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)

    @property
    def n_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def d(self) -> int:
        return self.activations.shape[1]

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows start:stop, read with pread into `out` (a C-contiguous array of that shape and dtype)
        or a new array: unlike touching the memmap, this leaves no mapped pages behind, so a process's
        memory does not grow with the file it reads."""
        a = self.activations
        if out is None:
            out = np.empty((stop - start, a.shape[1]), dtype=a.dtype)
        nbytes = (stop - start) * a.shape[1] * a.dtype.itemsize
        if _read_at(self._fd, memoryview(out).cast("B"), a.offset + start * a.shape[1] * a.dtype.itemsize,
                    self._seek_lock) != nbytes:
            raise ActivationFileError(f"{self.path} is shorter than its header says; re-run extract_activations.py")
        return out

    def example(self, i: int) -> np.ndarray:
        return self.read_rows(int(self.offsets[i]), int(self.offsets[i + 1]))

    def examples_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The example each of these rows of the file belongs to."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i's token ids and roles."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.token_ids[a:b]), np.asarray(self.token_role[a:b])


def open_activations(path: str, verify: bool = False) -> Activations:
    """The file memory-mapped; with verify, every byte checked against its CRC-32 first."""
    acts = Activations(path)
    if verify:
        acts.verify()
    return acts
