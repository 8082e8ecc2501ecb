"""Writing models: atomic (a staged file, then a rename), never over the model's own input files,
and with external data when the tensors would not fit protobuf's 2 GB limit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx

from iropt.errors import ModelSaveError
from iropt.io.stream import (
    EXTERNAL_MIN_BYTES,
    STREAM_MIN_BYTES,
    ExternalPayload,
    StreamedModel,
    export_streamed,
)
from iropt.ir.model import EXTERNAL_DATA_THRESHOLD, PROTOBUF_LIMIT, Model, graph_stats, tensor_bytes
from iropt.util.interrupt import raise_if_interrupted

# A check on a model about to be written (the ONNX checker, say): `save_model` hands it the
# model in memory (its skeleton, see iropt.io.stream), `save_proto` the staged file.
ModelCheck = Callable[[onnx.ModelProto | Path], None]


def save_model(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    check: ModelCheck | None = None,
) -> Path:
    """Write `model` atomically to `path`; returns the path written.

    `external_data=None` chooses external data when the tensors would pass the protobuf limit.
    Refuses to overwrite the file the model was loaded from. `check` (the ONNX checker, say)
    is given the model to be written, its large tensors as empty placeholders (see
    `iropt.io.stream`), before anything is written; if it raises, nothing is.
    """
    with stage_model(model, path, external_data=external_data, check=check) as staged:
        return publish_staged(staged)


def publish_staged(staged: StagedFiles) -> Path:
    """`staged.publish()`, a failure to rename said as a ModelSaveError."""
    try:
        return staged.publish()
    except OSError as error:
        raise ModelSaveError(f"{staged.out}: could not write the model: {error}") from error


def stage_model(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    check: ModelCheck | None = None,
) -> StagedFiles:
    """Write `model` for `path` into a scratch folder beside it, not yet published.

    As `save_model`, but the files stay staged until `publish()`, so the caller can test them
    first (run the written model) and publish only what passed; leaving the `with` block of
    the result without publishing removes them. The result holds no reference to `model`:
    once written, the caller may let the graph and its weights go.
    """
    out = Path(path)
    check_output_path(out, model.input_files())
    write, sidecars = _model_writer(model, out, external_data, check)
    staged = StagedFiles.create(out, sidecars)
    try:
        write(staged.path)
    except OSError as error:
        staged.discard()
        raise ModelSaveError(f"{out}: could not write the model: {error}") from error
    except BaseException:
        staged.discard()
        raise
    return staged


def _model_writer(
    model: Model, out: Path, external_data: bool | None, check: ModelCheck | None
) -> tuple[Callable[[Path], None], list[str]]:
    """What writes `model`'s files at a staged path, and the names of its side files."""
    streamed, external = _export_for(model, out, external_data)
    if check is not None:
        check(streamed.skeleton)
    data_name = out.name + ".data"
    payloads: list[ExternalPayload] = []
    if external:
        streamed, payloads = streamed.with_external_data(data_name)
        if streamed.byte_size() > PROTOBUF_LIMIT:
            # Too much stays inline (tensors in or read by If/Loop bodies, graph inputs or
            # outputs, typed fields): onnx's own converter moves every tensor out, copies and all.
            return _proto_writer(model.to_onnx(), True, check), [data_name]

    def write(staged: Path) -> None:
        _write_file(staged, streamed.write)
        if payloads:
            _write_file(staged.parent / data_name, lambda data: ExternalPayload.write_all(payloads, data))

    return write, [data_name] if payloads else []


def _export_for(model: Model, out: Path, external_data: bool | None) -> tuple[StreamedModel, bool]:
    """The streamed export to write, and whether it goes with external data.

    `None` decides by size: first from the constants (counted once, so an estimate), then from
    the exact size of the export, which may still be past protobuf's limit.
    """

    external = external_data
    if external is None:
        external = graph_stats(model).parameter_bytes > EXTERNAL_DATA_THRESHOLD
    streamed = export_streamed(model, EXTERNAL_MIN_BYTES if external else STREAM_MIN_BYTES)
    if external or streamed.byte_size() <= PROTOBUF_LIMIT:
        return streamed, external
    if external_data is False:
        raise ModelSaveError(
            f"{out}: the model is {streamed.byte_size()} bytes, past protobuf's 2 GiB limit; "
            "save it with external data"
        )
    return export_streamed(model, EXTERNAL_MIN_BYTES), True


def save_proto(
    proto: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    protected: Collection[Path] = (),
    check: ModelCheck | None = None,
) -> Path:
    """Atomically write a ModelProto; see `save_model`. `protected`: files not to write over
    (the input model and its data; see `check_output_path`). `check` is given the staged file."""
    out = Path(path)
    check_output_path(out, protected)
    if external_data is None:
        external_data = tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    sidecars = [out.name + ".data"] if external_data else []
    try:
        publish_atomically(out, sidecars, _proto_writer(proto, external_data, check))
    except OSError as error:
        raise ModelSaveError(f"{out}: could not write the model: {error}") from error
    return out


def _proto_writer(proto: onnx.ModelProto, external_data: bool, check: ModelCheck | None) -> Callable[[Path], None]:
    def write(staged: Path) -> None:
        _save_proto_file(proto, staged, external_data)
        if check is not None:
            check(staged)

    return write


def _save_proto_file(proto: onnx.ModelProto, staged: Path, external_data: bool) -> None:
    if not external_data:
        onnx.save_model(proto, str(staged))
        return
    onnx.save_model(
        proto,
        str(staged),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=staged.name + ".data",
        size_threshold=1024,
    )


def _write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as out:
        write(out)


def publish_atomically(out: Path, sidecars: list[str], write: Callable[[Path], None]) -> None:
    """`write(staged)` into a scratch folder beside `out`, then rename into place (atomic per file).

    The one way iropt publishes a file (models, engines, ONNX Runtime's own artefacts): a
    failure leaves nothing under the final name. See `StagedFiles`.
    """
    with StagedFiles.create(out, sidecars) as staged:
        write(staged.path)
        staged.publish()


class StagedFiles:
    """A file (and the side files beside it) written into a scratch folder next to its final
    path `out`, waiting to be published.

    `publish` moves the side files first, so a model file never points at data that is not
    there yet. The renames hold a lock on the folder, so two saves to one path cannot pair one's
    model with the other's data. Leaving the `with` block removes the scratch folder, and when
    nothing was published, the folders made for `out` too: an unpublished file leaves no trace.
    Scratch folders that a killed save left behind are removed when a new one is made.
    """

    def __init__(self, out: Path, sidecars: list[str], folder: Path, made: list[Path]) -> None:
        self.out = out
        self.sidecars = sidecars
        self.folder = folder
        self._made = made
        self.published = False

    @classmethod
    def create(cls, out: Path, sidecars: list[str]) -> StagedFiles:
        _remove_stale_staging(out)
        made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=_staging_prefix(out) + f"{os.getpid()}."))
        return cls(out, sidecars, folder, made)

    @property
    def path(self) -> Path:
        """Where the file is staged (its side files beside it, under their final names)."""
        return self.folder / self.out.name

    def publish(self) -> Path:
        """Rename the staged files into place; returns `out`."""
        raise_if_interrupted()  # never publish after a Ctrl-C, even one native code swallowed
        with _folder_lock(self.out.parent):
            for name in self.sidecars:
                if (self.folder / name).exists():  # onnx writes no data file when no tensor needs one
                    os.replace(self.folder / name, self.out.parent / name)
            os.replace(self.path, self.out)
        self.published = True
        return self.out

    def discard(self) -> None:
        """Remove the scratch folder (what is still staged in it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if not self.published:
            for folder in self._made:  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (something else was written there) or already gone

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.iropt-"


def _remove_stale_staging(out: Path) -> None:
    """Remove this path's scratch folders whose save process no longer runs (it was killed)."""
    prefix = _staging_prefix(out)
    try:
        candidates = [p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return
    for folder in candidates:
        pid_text = folder.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, but another user's
    return True


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on `folder` among iropt's saves (a no-op where flock is absent)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the renames are still atomic one by one
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def check_output_path(out: Path, protected: Collection[Path] = ()) -> None:
    """ModelSaveError unless a model can be written to `out` (its missing folders made on
    write) without touching `protected`.

    `protected` is what the model was read from (`Model.input_files`: the model, then its
    external data). Neither `out` nor the data file a save may write beside it (`out` + ".data")
    may be one of them: the input is never modified.
    """
    # Missing folders are made when the model is written (as onnxsim and onnxslim do); the
    # nearest one that exists must be a folder.
    nearest = next(folder for folder in (out.parent, *out.parent.parents) if folder.exists())
    if not nearest.is_dir():
        raise ModelSaveError(f"{out}: cannot make the output directory: {nearest} is not a directory")
    if out.is_dir():
        raise ModelSaveError(f"{out}: is a directory, expected a file name")
    refuse_special_file(out, "the output")
    inputs = [path.resolve() for path in protected]
    if out.resolve() in inputs[:1]:
        raise ModelSaveError(
            f"{out}: refusing to write over the input model; choose another output path with -o"
        )
    if out.resolve() in inputs:
        raise ModelSaveError(
            f"{out}: refusing to write over the input model's external data file; choose another "
            "output path with -o"
        )
    sidecar = out.parent / (out.name + ".data")
    refuse_special_file(sidecar, "the output's external data file")
    if sidecar.resolve() in inputs:
        raise ModelSaveError(
            f"{out}: its external data would go to {sidecar}, the input model's own external data "
            "file; choose another output path with -o"
        )



def check_output_file(path: Path, what: str, protected: Collection[Path] = ()) -> None:
    """ModelSaveError unless `what` (a report, an engine) can be written at `path` without
    replacing a folder, a device, or one of the `protected` files (the input, the output model)."""
    existing = next(parent for parent in path.parents if parent.exists())  # missing ones are made
    if not existing.is_dir():
        raise ModelSaveError(f"{path}: {existing} is a file, so the folder of {what} cannot be made")
    if path.is_dir():
        raise ModelSaveError(f"{path}: {what} names a directory, expected a file name")
    refuse_special_file(path, what)
    if path.resolve() in {p.resolve() for p in protected}:
        raise ModelSaveError(f"{path}: {what} would be written over a model of this run; choose another path")


def refuse_special_file(path: Path, what: str) -> None:
    """ModelSaveError when `path` exists and is not a regular file (a device, a pipe, a socket):
    a save replaces the file at its path, and must never replace one of those."""
    if path.exists() and not path.is_file():
        raise ModelSaveError(
            f"{path}: {what} exists and is not a regular file (a device, pipe or socket); "
            "refusing to replace it: choose another path"
        )


def write_bytes_atomically(out: Path, data: bytes) -> None:
    """Write `data` to `out` through `publish_atomically`."""
    def write(staged: Path) -> None:
        staged.write_bytes(data)

    publish_atomically(out, [], write)


@contextlib.contextmanager
def spilled_model_file(model: Model | onnx.ModelProto, work_dir: Path | None = None) -> Iterator[Path]:
    """The model written to a temporary file with its tensors as external data beside it, for
    tools that take a path when the model is past protobuf's 2 GB in-memory limit; removed on
    exit (ignoring cleanup errors: a runtime may still map the data file)."""
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="iropt-spill-", ignore_cleanup_errors=True) as tmp:
        target = Path(tmp) / "model.onnx"
        if isinstance(model, Model):
            yield save_model(model, target, external_data=True)
        else:
            yield save_proto(model, target, external_data=True)
