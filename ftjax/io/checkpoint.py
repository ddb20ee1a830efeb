"""Hugging Face model directories: lazy sharded reads, sharded streaming writes, atomic output.

Weight files are chosen only through `model.safetensors.index.json` (its `weight_map`) or a single
`model.safetensors`, never by globbing: repos such as Mistral's also ship `consolidated.safetensors`
with different tensor names. PyTorch pickles (`*.bin`, `*.pth`) are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ftjax.errors import FtjaxError
from ftjax.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorInfo

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DIFF_MARKER = "ftjax_diff.json"  # written by `ftjax diff`: the directory holds ft - base, not a model
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Directories ftjax writes that are not Hugging Face models (recognised where a model is opened, `_not_a_model`):
ORBAX_MANIFEST = "ftjax_orbax.json"  # an `ftjax convert --to orbax` directory (ftjax.io.orbax)
RUN_RECORD = "run.json"  # an `ftjax finetune` run directory (ftjax.runlog); its model is RUN/final
ORBAX_STEP_MARKER = "_CHECKPOINT_METADATA"  # an Orbax CheckpointManager step, e.g. RUN/checkpoints/10
_NOT_AUX = {INDEX_FILE, "pytorch_model.bin.index.json", "README.md", ORBAX_MANIFEST}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time.

    HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub.
    """
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(env.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def resolve_model_path(path_or_repo_id: str | os.PathLike) -> Path:
    """An existing local model directory, or a Hub repo id ("org/name[@revision]") found in the local
    HF cache (offline only: never touches the network). FtjaxError otherwise, also for a directory ftjax wrote
    that is not a model (a finetune run directory, a training or Orbax checkpoint: the message names what to use)."""
    path = _locate(path_or_repo_id)
    problem = _not_a_model(path)
    if problem:
        raise FtjaxError(problem)
    return path


def _locate(path_or_repo_id: str | os.PathLike) -> Path:
    """`resolve_model_path` for any input directory (an aux-file source, a path checked for nesting): no check
    that it holds a model."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise FtjaxError(f"{path}: is a file; expected a Hugging Face model directory (with config.json)")
    text = str(path_or_repo_id)
    cache = hub_cache_dir()
    if _REPO_ID.match(text):
        repo_id, _, revision = text.partition("@")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
        except Exception:  # not cached, incomplete snapshot, invalid id: all mean "not usable offline"
            pass
    raise FtjaxError(
        f"{text}: neither a directory nor a Hub repo in the local cache {cache}; "
        f"give a model directory, or download it first (e.g. `hf download {text}`)"
    )


def _not_a_model(path: Path) -> str | None:
    """The one-line error for a directory ftjax wrote that is not a model (a finetune run, its checkpoints, an
    Orbax checkpoint), saying which model to pass instead; None for anything else."""
    run = next((p for p in (path, path.parent, path.parent.parent) if (p / RUN_RECORD).is_file()), None)
    if (path / ORBAX_MANIFEST).is_file():
        return (f"{path} is an ftjax Orbax checkpoint, not a Hugging Face model; export it first: "
                f"ftjax convert {path} OUT --to hf")
    if (path / ORBAX_STEP_MARKER).is_file():
        final = f"; the finished run's model is {run / 'final'}" if run is not None else ""
        return (f"{path} is an Orbax training checkpoint, not a Hugging Face model; export it first: "
                f"ftjax convert {path} OUT --to hf{final}")
    if run is not None and not (path / "config.json").is_file():
        return (f"{path} is (inside) an `ftjax finetune` run directory, not a model; use {run / 'final'} (the "
                f"exported model) or export a checkpoint: ftjax convert {run}/checkpoints/STEP OUT --to hf")
    return None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FtjaxError(f"{path}: {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise FtjaxError(f"{path}: cannot read {what}: {e.strerror or e}") from None


def _no_weights_error(path: Path) -> FtjaxError:
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        return FtjaxError(
            f"{path}: only PyTorch pickle weights ({', '.join(pickles[:3])}) and no {SINGLE_FILE} or {INDEX_FILE}; "
            "ftjax never unpickles. Convert once with transformers: "
            f"AutoModelForCausalLM.from_pretrained('{path}').save_pretrained(OUT, safe_serialization=True)"
        )
    others = [f for f in files if f.endswith(".safetensors")]
    hint = f" (found {', '.join(others[:3])}, which is not the Hugging Face layout)" if others else ""
    return FtjaxError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}; not a Hugging Face safetensors checkpoint")


def aux_files(path: Path) -> list[Path]:
    """Non-weight files of a model directory to carry along (config, tokenizer, chat template, ...)."""
    weights = lambda name: name.startswith(".") or name in _NOT_AUX or name.endswith(_WEIGHT_SUFFIXES)  # noqa: E731
    return sorted(p for p in Path(path).iterdir() if p.is_file() and not weights(p.name))


class HFCheckpoint:
    """A Hugging Face model directory (or cached Hub repo), read lazily: shard headers are opened on
    first use, tensors are read-only memory-mapped views."""

    def __init__(self, path_or_repo_id: str | os.PathLike, *, allow_diff: bool = False):
        """allow_diff: open a diff directory written by `ftjax diff` (`DIFF_MARKER`) too; by default it is refused,
        since its tensors are ft - base and not a model."""
        self.path = resolve_model_path(path_or_repo_id)
        if not allow_diff and (self.path / DIFF_MARKER).is_file():
            raise FtjaxError(f"{self.path} is a diff written by `ftjax diff` ({DIFF_MARKER}), not a model; apply it "
                             f"to a base first: ftjax apply --target BASE --diff {self.path} --out OUT")
        self.is_diff = (self.path / DIFF_MARKER).is_file()
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FtjaxError(f"{self.path}: no config.json; not a Hugging Face model directory")
        self.config: dict = _read_json(config_path, "config.json")
        if not isinstance(self.config, dict):
            raise FtjaxError(f"{config_path}: config.json must be a JSON object")
        self._shards: dict[str, SafetensorsFile] = {}
        self._index_path: Path | None = None
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            self._weight_map = self._read_index(index_path)
        elif (self.path / SINGLE_FILE).is_file():
            f = self._shards[SINGLE_FILE] = SafetensorsFile(self.path / SINGLE_FILE)
            self._weight_map = {name: SINGLE_FILE for name in f.names()}
        else:
            raise _no_weights_error(self.path)

    def _read_index(self, index_path: Path) -> dict[str, str]:
        self._index_path = index_path
        index = _read_json(index_path, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise FtjaxError(f"{index_path}: has no \"weight_map\" object; corrupt index")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or ".." in shard:
                msg = f"tensor {name!r} maps to shard {shard!r}, which is not a plain file name in the model directory"
                raise FtjaxError(f"{index_path}: {msg}")
        for shard in dict.fromkeys(weight_map.values()):
            if not (self.path / shard).is_file():
                raise FtjaxError(f"{index_path}: names shard {shard!r}, which does not exist in {self.path}")
        return dict(weight_map)

    def _shard(self, name: str) -> SafetensorsFile:
        try:
            shard = self._weight_map[name]
        except KeyError:
            raise FtjaxError(f"{self.path}: checkpoint has no tensor {name!r}") from None
        f = self._shards.get(shard)
        if f is None:
            f = self._shards[shard] = SafetensorsFile(self.path / shard)
        if name not in f:
            raise FtjaxError(f"{self._index_path}: lists tensor {name!r} in {f.path}, but that file lacks it")
        return f

    def names(self) -> list[str]:
        """Tensor names in checkpoint order (index order, or file order for a single file)."""
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def info(self, name: str) -> TensorInfo:
        """Name, dtype and shape of tensor `name`."""
        return self._shard(name).info(name)

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only zero-copy memmap view (stored dtype, HF layout)."""
        return self._shard(name).get(name)

    def get_slice(self, name: str, index: Any) -> np.ndarray:
        """A basic-indexing view of tensor `name`, e.g. `(slice(r0, r1),)` for a block of rows."""
        return self._shard(name).get_slice(name, index)

    def file_of(self, name: str) -> Path:
        """The shard file holding tensor `name`."""
        return self._shard(name).path

    @property
    def files(self) -> list[Path]:
        """Weight files in first-use order of the index (or the single file)."""
        return [self.path / s for s in dict.fromkeys(self._weight_map.values())]

    @property
    def total_bytes(self) -> int:
        """Sum of tensor data sizes in bytes (opens every shard header)."""
        return sum(self.info(name).nbytes for name in self._weight_map)

    def aux_files(self) -> list[Path]:
        """Non-weight files to carry along (config.json, tokenizer*, generation_config.json, ...)."""
        return aux_files(self.path)

    def close(self) -> None:
        """Close all opened shards (views already handed out stay valid)."""
        for f in self._shards.values():
            f.close()
        self._shards.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, {len(self._weight_map)} tensors)"


def plan_shards(infos: Sequence[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Split `infos` in order into shards of at most `max_shard_bytes` (greedy; a bigger tensor
    gets a shard of its own). Always at least one (possibly empty) shard."""
    if max_shard_bytes <= 0:
        raise FtjaxError(f"max shard size must be positive, got {max_shard_bytes} bytes")
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class HFCheckpointWriter:
    """Writes a Hugging Face safetensors checkpoint into `dir`, streaming, in the order of `infos`.

    One shard -> `model.safetensors`; several -> `model-0000i-of-0000N.safetensors` plus
    `model.safetensors.index.json`. `write(name, array)` takes the whole tensor or consecutive
    leading-axis row chunks. `close()` checks completeness, fsyncs and writes the index.

    Multi-process: every process plans the same shards; with `part=(i, n)` this writer writes shards i, i+n, ...
    (the others' tensors are refused) and only part 0 writes the index.
    """

    def __init__(self, dir: str | os.PathLike, infos: Sequence[TensorInfo],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 part: tuple[int, int] = (0, 1)):
        self.dir = Path(dir)
        self.infos = list(infos)
        self.shards = plan_shards(self.infos, max_shard_bytes)
        n = len(self.shards)
        self.filenames = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._metadata = {"format": "pt"} if metadata is None else metadata
        self._shard_of = {info.name: i for i, shard in enumerate(self.shards) for info in shard}
        if len(self._shard_of) != len(self.infos):
            raise FtjaxError(f"{self.dir}: duplicate tensor names in the checkpoint plan")
        self._mine = list(range(part[0], n, part[1]))
        self._own = set(self._mine)
        self._write_index = part[0] == 0
        self._current = -1  # index into self._mine of the open shard
        self._writer: SafetensorsWriter | None = None
        self._closed = False
        self.dir.mkdir(parents=True, exist_ok=True)

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._current += 1
        i = self._mine[self._current]
        self._writer = SafetensorsWriter(self.dir / self.filenames[i], self.shards[i], self._metadata)

    def tensors(self) -> list[str]:
        """The tensors this writer writes (all of them unless `part` says otherwise), in order."""
        return [info.name for i in self._mine for info in self.shards[i]]

    def write(self, name: str, array: Any) -> None:
        """Append `array` (the whole tensor or its next row chunk) to tensor `name`."""
        if self._closed:
            raise FtjaxError(f"{self.dir}: checkpoint writer is closed")
        i = self._shard_of.get(name)
        if i is None or i not in self._own:
            raise FtjaxError(f"{self.dir}: tensor {name!r} is not in the planned checkpoint"
                             + ("" if i is None else " part this process writes"))
        while self._current < 0 or self._mine[self._current] < i:  # earlier shards get closed (checked) on the way
            self._open_next()
        if i < self._mine[self._current]:
            raise FtjaxError(f"{self.dir}: tensor {name!r} written out of order (its shard is already closed)")
        self._writer.write(name, array)

    def close(self) -> None:
        """Finish every shard, check all tensors were written, write the index if sharded."""
        if self._closed:
            return
        try:
            while self._current < len(self._mine) - 1:
                self._open_next()
            if self._writer is not None:
                self._writer.close()
            if len(self.shards) > 1 and self._write_index:
                weight_map = {name: self.filenames[i] for name, i in sorted(self._shard_of.items())}
                total = sum(info.nbytes for info in self.infos)
                write_json(self.dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Stop and remove every file this writer created."""
        self._closed = True
        if self._writer is not None:
            self._writer.abort()
        opened = [self.filenames[i] for i in self._mine[: self._current + 1]]
        for name in opened + ([INDEX_FILE] if self._write_index else []):
            (self.dir / name).unlink(missing_ok=True)

    def __enter__(self) -> "HFCheckpointWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _raise_enospc(e: OSError, fallback: Path) -> None:
    if e.errno == errno.ENOSPC:
        raise FtjaxError(f"no space left on device while writing {e.filename or fallback}") from None


def os_error(e: OSError, fallback: Path) -> FtjaxError:
    """A one-line FtjaxError for an OSError met while writing under `fallback` (ENOSPC named as such)."""
    if e.errno == errno.ENOSPC:
        return FtjaxError(f"no space left on device while writing {e.filename or fallback}")
    return FtjaxError(f"{e.filename or fallback}: cannot write: {e.strerror or e}")


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON (HF style) and fsync; ENOSPC -> FtjaxError naming the file."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _raise_enospc(e, path)
        raise FtjaxError(f"{path}: cannot write: {e.strerror or e}") from None


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike, skip: Iterable[str] = ()) -> list[Path]:
    """Copy the non-weight files of model dir `src` into `dst` (following cache symlinks), except
    the names in `skip`. Returns the written paths."""
    skip = set(skip)
    written = []
    for p in aux_files(Path(src)):
        if p.name in skip:
            continue
        target = Path(dst) / p.name
        try:
            shutil.copyfile(p, target)
        except OSError as e:
            _raise_enospc(e, target)
            raise FtjaxError(f"{p}: cannot copy to {target}: {e.strerror or e}") from None
        written.append(target)
    return written


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, owned by someone else
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_stale_siblings(out: Path) -> None:
    """Remove `.<name>.ftjax-tmp-<pid>` (and `-old-` if out exists) left by dead processes."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.ftjax-(tmp|old)-(\d+)$")
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "tmp" or out.exists():  # an orphaned -old- may be the only copy: keep it
            shutil.rmtree(p, ignore_errors=True)


def _fsync(path: str | os.PathLike) -> None:
    """fsync a file or a directory (so renames and new entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_not_nested(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    real_out = Path(os.path.realpath(out))
    for inp in inputs:
        if inp is None:
            continue
        if not Path(inp).exists():  # maybe a Hub repo id: guard its cache snapshot too
            try:
                inp = _locate(inp)
            except FtjaxError:
                continue
        real_in = Path(os.path.realpath(inp))
        if real_out == real_in or real_in in real_out.parents or real_out in real_in.parents:
            raise FtjaxError(f"output {out} is, contains or lies in input {inp}; choose an output outside the inputs")


# What may be replaced. ftjax deletes nothing it did not write: `--overwrite` replaces an existing OUT only when it
# is empty, or it holds exactly what an ftjax record in it (a provenance file `ftjax_*.json` with a "files" list)
# says ftjax wrote, or it is a plain model directory: config.json plus safetensors weights, tokenizer and generation
# files, ftjax's own files, and nothing else (no subdirectory, no other file).
RECORD_KEY = "files"
_MODEL_FILES = re.compile(r"^(config\.json|generation_config\.json|model.*\.safetensors(\.index\.json)?|"
                          r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
                          r"chat_template\.(jinja|json)|ftjax_[\w.-]+)$")


def _recorded_files(out: Path) -> set[str] | None:
    """The entries an ftjax record in `out` lists (with the record itself), or None if `out` has no record."""
    for record in sorted(out.glob("ftjax_*.json")):
        try:
            listed = json.loads(record.read_text(encoding="utf-8")).get(RECORD_KEY)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(listed, list) and all(isinstance(n, str) for n in listed):
            return set(listed) | {record.name}
    return None


def check_replaceable(out: Path) -> None:
    """FtjaxError, naming a file that would be destroyed, unless directory `out` may be replaced (see above)."""
    entries = sorted(out.iterdir(), key=lambda p: p.name)
    if not entries:
        return
    recorded = _recorded_files(out)
    if recorded is not None:
        others = [p for p in entries if p.name not in recorded]
    else:
        names = {p.name for p in entries}
        model = "config.json" in names and any(n.endswith(".safetensors") for n in names)
        others = entries if not model else [p for p in entries if p.is_dir() or not _MODEL_FILES.match(p.name)]
    if others:
        raise FtjaxError(f"{out} holds {others[0].name}{'/' if others[0].is_dir() else ''}, which ftjax did not "
                         "write; --overwrite replaces only an empty directory or an output of ftjax (or a plain model "
                         "directory); choose another output or move that file away")


def check_output(out: str | os.PathLike, *, overwrite: bool, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """The checks on an output directory before anything is written: not an input, nor inside or around one; if it
    exists, replaced only with `overwrite` and only if `check_replaceable` allows. Returns `out` as an absolute path."""
    out = Path(os.path.abspath(out))
    _check_not_nested(out, inputs)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FtjaxError(f"{out} already exists; pass --overwrite to replace it, or choose another output")
        if not out.is_dir() or out.is_symlink():
            raise FtjaxError(f"{out} exists and is not a directory; remove it or choose another output")
        check_replaceable(out)
    return out


def check_files_dir(out: str | os.PathLike, own: Sequence[str]) -> Path:
    """Check a directory that a command will write the files `own` into (scan.json, scan.png ...): missing (it is
    created when written), or holding only those files (a previous run's, then replaced); else FtjaxError naming the
    first other entry. Call it before any compute, so a refusal costs nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FtjaxError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in own)
        if others:
            raise FtjaxError(f"{out} holds {others[0]}, which this command did not write; choose an empty or new "
                             f"--out directory (it writes {', '.join(own)})")
    return out


def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                       inputs: Sequence[str | os.PathLike | None] = (), pid: int | None = None) -> tuple[Path, Path]:
    """`check_output`, then clear stale temp siblings and create the temp sibling `.<name>.ftjax-tmp-<pid>` (pid: this
    process's by default). Returns (out, tmp) as absolute paths."""
    out = check_output(out, overwrite=overwrite, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FtjaxError(f"cannot create {out.parent}: {e.strerror or e}") from None
    _remove_stale_siblings(out)
    tmp = temp_sibling(out, os.getpid() if pid is None else pid)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        _raise_enospc(e, tmp)
        raise FtjaxError(f"cannot create {tmp}: {e.strerror or e}") from None
    return out, tmp


def temp_sibling(out: Path, pid: int) -> Path:
    """Where a run with process id `pid` (process 0's, in a multi-process run) builds `out` before renaming it."""
    return out.parent / f".{out.name}.ftjax-tmp-{pid}"


def discard_output_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temp sibling `.<name>.ftjax-tmp-<pid>` to write into; on success fsync it and rename it
    to `out` (an existing `out` is replaced only then, and only with `overwrite`); on any exception
    remove it, leaving `out` untouched. Refuses an `out` equal to, inside, or containing an input."""
    out, tmp = prepare_output_dir(out, overwrite=overwrite, inputs=inputs)
    try:
        yield tmp
        finish_output_dir(tmp, out)
    except BaseException as e:
        discard_output_dir(tmp)
        if isinstance(e, OSError):
            _raise_enospc(e, tmp)
        raise


def finish_output_dir(tmp: Path, out: Path) -> None:
    """fsync `tmp`, then rename it to `out`, swapping out an existing `out` only at the very end."""
    try:
        for dirpath, _, filenames in os.walk(tmp):
            for name in filenames:
                _fsync(os.path.join(dirpath, name))
            _fsync(dirpath)
        if out.exists():
            old = out.parent / f".{out.name}.ftjax-old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync(out.parent)
    except OSError as e:
        _raise_enospc(e, tmp)
        raise FtjaxError(f"cannot finish output {out}: {e.strerror or e} ({e.filename or tmp})") from None


def save_hf(
    out: str | os.PathLike,
    tensors: dict[str, Any],
    *,
    config: dict,
    aux_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Atomically write a HF checkpoint dir: `tensors` (flat HF names -> arrays, stored in their own
    dtype, in dict order), `config` as config.json, and the aux files (tokenizer, ...) of `aux_from`."""
    src = _locate(aux_from) if aux_from is not None else None
    infos = [TensorInfo(name, np.dtype(a.dtype), tuple(a.shape)) for name, a in tensors.items()]
    with atomic_output_dir(out, overwrite=overwrite, inputs=[*inputs, src]) as tmp:
        if src is not None:
            copy_aux_files(src, tmp, skip=("config.json",))
        write_json(tmp / "config.json", config)
        with HFCheckpointWriter(tmp, infos, max_shard_bytes) as writer:
            for name, array in tensors.items():
                writer.write(name, np.asarray(array))
    return Path(out)
