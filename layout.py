"""The TencentGR data layout, read safely: errors, the restricted unpickler, atomic writes, JSON and
offsets readers, record validation and the layout's constants. Torch-free, so every script
(evaluation, conversion, CTR priors, demo data) can use it without importing torch.

The layout is described in docs/DATA_FORMAT.md. Every reader here fails with a DataError whose
message is one line naming the file, the line or record and what was expected.
"""
import argparse
import contextlib
import errno
import fcntl
import io
import itertools
import json
import os
import pickle
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

# Token types of an encoder sequence: [user token] + item events, left-padded.
PAD, USER_TOKEN, ITEM_TOKEN = 0, 1, 2
# Action ids on tokens and targets are action_type + 1 (0 is padding): 1 exposure, 2 click, 3 conversion.
CLICK = 2
# TencentGR timestamps are Unix seconds; its users live in UTC+8 (hour of day and weekday are local).
TZ_OFFSET = 8 * 3600
# Gap to the previous event: 0 pad, 1 "no previous event", 2.. log2 buckets of the gap in seconds.
GAP_BUCKETS = 32
# Embedding rows of each calendar and gap feature (0 = padding).
TIME_VOCAB = {"hour": 25, "weekday": 8, "week": 54, "gap_bucket": GAP_BUCKETS}
# item_recent: bucket 0 = no event in the window; then one per doubling of the item's share of the
# window's events, relative to an even share over the catalogue (RECENT_MID: exactly an even share)
RECENT_BUCKETS, RECENT_MID = 16, 8
# Largest id the readers accept: ids are stored as int64.
MAX_ID = 2**63 - 1
RECORD_LAYOUT = "[user_id, item_id, user_feat, item_feat, action_type, timestamp]"


@dataclass(frozen=True)
class DataConfig:
    """The data's schema and feature switches: everything the readers need to rebuild features and
    the model needs to size its tables (the one home of these settings, shared by dataset.py and
    model.py); stored in the checkpoint. Frozen: a step that learns something from the data
    returns a new one (dataclasses.replace)."""
    maxlen: int = 100                 # item events in the input window (plus one user token)
    max_array_len: int = 8            # array features keep at most this many values
    use_timefeat: bool = True
    use_userctr: bool = False
    use_itemctr: bool = False
    mm_emb_id: list = field(default_factory=list)
    num_users: int = 0
    num_items: int = 0
    user_sparse: dict = field(default_factory=dict)   # fid -> vocab size (max re-id + 1)
    user_array: dict = field(default_factory=dict)
    item_sparse: dict = field(default_factory=dict)
    item_array: dict = field(default_factory=dict)
    mm_dims: dict = field(default_factory=dict)       # fid -> vector length
    ctr_meta: dict = field(default_factory=dict)      # precompute_ctr's ctr_meta.json
    use_sid: bool = False             # semantic-id codes of the item's multimodal vectors in the item token
    new_item_events: int = 0          # an item's first N training events show it as a new item (no id row)
    sid: dict = field(default_factory=dict)           # their codebook (precompute_sid.py), so inference needs no file

    # Fields added after checkpoints were first written, each with the value that reproduces a
    # checkpoint written before it existed (checkpoint.config_from_dict fills them in).
    LEGACY: ClassVar[dict] = {}
    RENAMED: ClassVar[dict] = {}
    REMOVED: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return asdict(self)



class DataError(Exception):
    """Bad or missing input. Scripts print str(err) as one line and exit non-zero."""

    def __str__(self):
        # A DataLoader worker re-raises as "Caught DataError in DataLoader worker ...\nOriginal
        # Traceback ...\nlayout.DataError: <msg>": keep only the original one-line message.
        msg = super().__str__()
        if msg.startswith("Caught DataError") and "DataError: " in msg:
            msg = msg.rsplit("DataError: ", 1)[1].strip()
        return msg


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_deadline(grace_s: float) -> None:
    """Once a stop signal arrives, the process ends within grace_s seconds, whatever the main thread
    is doing: a watcher thread reads the signal numbers Python's C-level handler writes to its
    wakeup pipe (even while the main thread sits in a call that holds off Python's handlers) and,
    if unwinding has not ended the process by then, prints the stop line and exits 128 + N. The
    next start sweeps what that leaves (staged files, temporary names). For inference, whose
    harness expects a stopped process to go; training is left to reach its checkpoint."""
    import threading
    import time
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch():
        while True:
            got = os.read(r, 64)
            sig = next((b for b in got if b in {int(x) for x in STOP_SIGNALS}), None)
            if sig is not None:
                break
        time.sleep(grace_s)
        os.write(2, f"stopped by {signal.Signals(sig).name} (forced after {grace_s:g} s of unwinding)\n".encode())
        os._exit(128 + sig)
    threading.Thread(target=watch, name="stop-deadline", daemon=True).start()


def run_cli(main, exit_codes=None, stop_grace_s=None):
    """A script's entry point: runs main(); a known error (DataError, exit 2, plus any given in
    exit_codes) becomes one "error: ..." line on stderr and that exit code, never a traceback. So
    does an operating-system error (a full disk, a folder that cannot be written): exit 2, naming
    the file. A stop signal (Ctrl-C, SIGTERM, SIGHUP) unwinds the work and ends it with one
    "stopped by SIG..." line and the shell's code for it, 128 + the signal's number (130, 143);
    with stop_grace_s, within that many seconds even if unwinding hangs (stop_deadline)."""
    codes = {DataError: 2, **(exit_codes or {})}
    stop_on_signals()
    if stop_grace_s is not None:
        stop_deadline(stop_grace_s)
    try:
        main()
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else int(signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}" + (f": {e.message}" if getattr(e, "message", "") else ""),
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    except tuple(codes) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(next(c for t, c in codes.items() if isinstance(e, t)))
    except OSError as e:
        print(f"error: {os_error(e)}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: a bad or missing flag prints "error: <what
    argparse said>" (which names the flag) and exits 2, without the multi-line usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_writable(folder, what, create=True) -> None:
    """Prove a file can be written in `folder` before any long work; DataError naming the folder
    and its role (`what`, e.g. "--out") otherwise. create=False leaves no trace: a folder that
    does not exist yet is judged by its nearest existing parent."""
    folder = os.fspath(folder) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder ({what}), expected a folder to write into")
    probe = folder
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        else:
            probe = os.path.abspath(folder)
            while not os.path.exists(probe):
                probe = os.path.dirname(probe)
            if not os.path.isdir(probe):
                raise NotADirectoryError(errno.ENOTDIR, f"{probe} is a file", folder)
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DataError(f"{folder}: cannot write there ({what}: {e.strerror or e})") from None


def os_error(e: OSError) -> str:
    """An OSError as one line: the file, then what the system said."""
    what = e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{e.filename}: {what}" if e.filename else what


# ---------------------------------------------------------------------------------------------
# Safe file I/O
# ---------------------------------------------------------------------------------------------

# The layout's pickles hold only builtin containers and numbers, plus defaultdict (indexer['f'])
# and, in emb_81_32.pkl, numpy arrays. Anything else could execute code on load.
_SAFE_GLOBALS = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bytes"), ("builtins", "bool"), ("builtins", "complex"),
    ("collections", "defaultdict"), ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "float32"), ("numpy", "float64"),
    ("numpy", "int64"), ("numpy", "int32"), ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _first_line(e):
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_pickle(path):
    """Unpickle `path` allowing only the builtin types these data files hold."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file, expected a pickle")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or invalid pickle ({_first_line(e)}); only builtin containers, "
                        f"numbers and numpy arrays are allowed") from None
    except Exception as e:  # a damaged pickle fails in many ways: EOFError, ValueError, struct.error...
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {_first_line(e)})") from None


@contextlib.contextmanager
def atomic_write(path, mode="w", **kwargs):
    """Open a temporary file next to `path`; on success flush, fsync and rename it over `path`.

    A crash midway leaves `path` untouched (old content or absent), never half-written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a file to write", path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot create its folder {d}: a file is in the way",
                                 path) from None
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)       # mkstemp makes 0600; give the usual file mode
        with io.open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            # numpy's tofile (np.save uses it) writes through a C stdio buffer whose failed final
            # flush it does not report: a full disk could leave a short file here. What the
            # handle says it wrote must be what the file holds.
            if "b" in mode and os.fstat(f.fileno()).st_size < f.tell():
                raise OSError(errno.EFBIG, f"wrote {f.tell()} bytes but the file holds "
                                           f"{os.fstat(f.fileno()).st_size}; is the disk full?", path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if type(e) is RuntimeError and isinstance(e.__context__, OSError):
            e = e.__context__               # torch.save turns a failed write into a RuntimeError
        if isinstance(e, OSError) and (e.filename is None or e.filename == tmp):
            # numpy's tofile says only "N requested and M written"; name the file being written
            why = e.strerror or (f"write failed ({e}); is the disk full?" if str(e) else "write failed")
            raise OSError(e.errno, why, path) from None
        raise


def file_fingerprint(path) -> dict:
    """Size and modification time of a file: what a derived cache records of its source, to tell
    when the source changed."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_source(recorded, path) -> bool:
    """Whether a recorded file_fingerprint still describes `path` (size and time; the folder may
    have moved)."""
    if not isinstance(recorded, dict) or not os.path.exists(path):
        return False
    now = file_fingerprint(path)
    return recorded.get("size") == now["size"] and recorded.get("mtime_ns") == now["mtime_ns"]


def dump_pickle(obj, path):
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def dump_json(obj, path, **kwargs):
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **kwargs)


# ---------------------------------------------------------------------------------------------
# Run ownership, interrupted work and signals
# ---------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"


class Busy(DataError):
    """A folder is held by another live run (own_folder without waiting)."""


def command_line() -> str:
    """This process's command, short enough for one line (what own_folder records of the holder)."""
    cmd = " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])
    return cmd if len(cmd) <= 160 else cmd[:157] + "..."


def _holder(fd) -> str:
    """Who holds a lock file, as its holder wrote it: "pid N: command"."""
    try:
        h = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(h['pid'])}: {h['command']}"
    except (ValueError, TypeError, KeyError, OSError):
        return "a process that has not yet written its pid"


@contextlib.contextmanager
def own_folder(folder, what, wait=False, say=None):
    """Hold `folder` for the block: an exclusive flock on folder/.lock, into which the holder's pid
    and command are written. The kernel releases it when the holder ends, however it ends (a
    kill included): a lock left by a dead run never blocks. Held by another live run: wait=False
    raises Busy, one line naming the folder, its role (`what`, e.g. "TRAIN_CKPT_PATH") and the
    holder; wait=True says so once (say, default print) and blocks until the holder is done.
    The lock file stays (deleting it would let two runs lock two different files), except when
    this call made the folder and the block failed: then the folder goes again if nothing else is
    in it (bad input leaves no trace)."""
    folder = os.fspath(folder)
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, LOCK_FILE)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            if not wait:
                raise Busy(f"{folder}: in use by another run ({who}); wait for it to end or use another {what}") \
                    from None
            (say or print)(f"notice: {folder} ({what}) is in use by another run ({who}); waiting for it to end")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command_line()}).encode(), 0)
        try:
            yield
        except BaseException:
            if made and os.listdir(folder) == [LOCK_FILE]:
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                    os.rmdir(folder)
            raise
    finally:
        os.close(fd)


def sweep_temp(folder, match) -> tuple:
    """Remove the temporary files that a killed writer left in `folder` (names for which
    match(name) is true; atomic_write's are ".<name>.<random>.tmp"). Only safe while this run owns
    the folder (own_folder): no live writer can be using them. -> (files removed, bytes freed)."""
    n = size = 0
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(folder):
            if e.name.startswith(".") and e.name.endswith(".tmp") and match(e.name) and e.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    size += e.stat(follow_symlinks=False).st_size
                    os.unlink(e.path)
                    n += 1
    return n, size


PUBLISH_JOURNAL = ".publishing.json"


def publish_files(folder, pairs) -> None:
    """Rename staged files over their final names as one unit. A journal naming every pair (and
    each staged file's size) is written first; from then on the new set is committed: should the
    process die during the renames, finish_publish completes them at the next start. The journal
    goes once the last rename is done. Should a rename fail here (an OSError), every file of the
    set, new and earlier alike, is removed and a DataError says so: no mix of two runs remains.
    pairs: [(staged path, final path)], all in `folder`."""
    folder = os.fspath(folder)
    journal = os.path.join(folder, PUBLISH_JOURNAL)
    dump_json({"files": [[os.path.basename(t), os.path.basename(f), os.path.getsize(t)] for t, f in pairs]}, journal)
    done = 0
    try:
        for t, f in pairs:
            os.replace(t, f)
            done += 1
    except OSError as e:
        for t, f in pairs:
            for p in (t, f):
                with contextlib.suppress(OSError):
                    os.unlink(p)
        with contextlib.suppress(OSError):
            os.unlink(journal)
        why = os_error(OSError(e.errno, e.strerror or str(e), pairs[done][1]))
        raise DataError(f"{why}; removed the outputs of this run ({done} already renamed) and the earlier ones, "
                        f"so {folder} holds no mix of two runs: run again") from None
    os.unlink(journal)


def finish_publish(folder, say=print) -> int:
    """Complete the publish of a run killed during its renames (publish_files' journal is there):
    the staged files still waiting are renamed into place, so the folder holds that run's whole
    set. Should a part be neither staged nor in place, every file of the set is removed instead
    (no mix of two runs). Call while owning the folder. -> files renamed now."""
    folder = os.fspath(folder)
    journal = os.path.join(folder, PUBLISH_JOURNAL)
    if not os.path.exists(journal):
        return 0
    try:
        rec = read_json(journal)
        files = [(str(t), str(f), int(n)) for t, f, n in rec["files"]]
    except (DataError, KeyError, TypeError, ValueError):
        files = None
    ok = files is not None and all(
        os.path.basename(t) == t and os.path.basename(f) == f and (
            os.path.isfile(os.path.join(folder, t)) or
            os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) == n)
        for t, f, n in files)
    if not ok:
        for _, f, _ in files or []:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, os.path.basename(f)))
        os.unlink(journal)
        say(f"notice: {folder}: an earlier run was stopped while publishing its outputs and its set cannot be "
            f"completed; removed its files, so no mix of two runs remains")
        return 0
    done = 0
    for t, f, _ in files:
        if os.path.isfile(os.path.join(folder, t)):
            os.replace(os.path.join(folder, t), os.path.join(folder, f))
            done += 1
    os.unlink(journal)
    say(f"notice: {folder}: an earlier run was stopped while publishing its outputs; completed it ({done} of "
        f"{len(files)} files renamed now), so the folder holds that run's whole set")
    return done


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGHUP; SIGINT arrives as KeyboardInterrupt) became an exception, so
    the work unwinds: temporary files go, DataLoader workers are stopped. run_cli turns it into one
    line and exit code 128 + the signal's number. A BaseException: no `except Exception` swallows it."""

    def __init__(self, signum, message=""):
        self.signum, self.message = int(signum), message
        super().__init__(message)


def _quiet_exit(signum, frame):
    os._exit(0)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Interrupted in the main thread (Python's default: die at once,
    leaving temporary files and children behind)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the thread that forked it ends (PR_SET_PDEATHSIG); exit
    at once if `parent`, the process that forked it, is gone already."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))     # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(0)                   # the parent died before the line above took effect


_FORK_HOOK = {"parent": None}


def children_die_with_me() -> None:
    """Every child this process forks from now on (DataLoader workers) dies with it from its
    first instruction on, even when this process is SIGKILLed: worker_signals does the same from
    the worker's init, which a worker forked just before the kill never reached; it then lived on
    as an orphan and wrote a traceback into the shared stderr. Idempotent."""
    if _FORK_HOOK["parent"] is None and hasattr(os, "register_at_fork"):
        _FORK_HOOK["parent"] = os.getpid()
        os.register_at_fork(before=lambda: _FORK_HOOK.update(parent=os.getpid()),
                            after_in_child=lambda: _die_with_parent(_FORK_HOOK["parent"]))


def _quiet_when_orphaned(parent: int, wait_s: float = 1.0):
    """sys.excepthook for a DataLoader worker. Tensors reach the main process over sockets that
    multiprocessing's resource-sharer thread serves; when the main process is SIGKILLed its end of a
    socket closes before the kernel sends this worker PR_SET_PDEATHSIG, and the thread's EOF was
    printed as a half traceback into the shared stderr. Such a connection error waits up to
    wait_s for the parent to go: if it does (or the signal comes first), nothing is printed; with
    the parent alive, or any other error, the traceback is printed as before."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, (EOFError, ConnectionError)):
            end = time.monotonic() + wait_s
            while os.getppid() == parent and time.monotonic() < end:
                time.sleep(0.01)
            if os.getppid() != parent:
                return
        default(kind, value, tb)
    return hook


def worker_signals(keep_on_term: bool = False) -> None:
    """In a DataLoader worker (worker_init_fn): stop signals are the main process's to handle (it
    unwinds and stops its workers), so a worker ignores Ctrl-C sent to the whole process group.
    SIGTERM and SIGHUP end it quietly (exit 0, which the DataLoader does not report as a crash;
    the main process's shutdown also sends SIGTERM to a worker stuck in a batch), unless
    keep_on_term: training's workers live on to deliver the batch its main process needs to reach
    a checkpoint. A worker dies with its parent, even one killed by SIGKILL, instead of living on
    as an orphan (Linux: PR_SET_PDEATHSIG), and prints nothing about the parent's sockets closing
    under it on the way (_quiet_when_orphaned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN if keep_on_term else _quiet_exit)
    import multiprocessing
    parent = multiprocessing.parent_process()
    if parent is not None:
        _die_with_parent(parent.pid)
        sys.excepthook = _quiet_when_orphaned(parent.pid)


# ---------------------------------------------------------------------------------------------
# Layout readers
# ---------------------------------------------------------------------------------------------

def read_offsets(path, seq_path=None):
    """Byte offsets of each line. Accepts the list the layout specifies or a {reid: offset} dict
    written by some converters (then lines are taken in file order).

    The offsets are checked against the sequence file (`seq_path`; by default `<name>.jsonl`
    beside `<name>_offsets.pkl`, when it exists) without reading it all: they must increase, and
    the last one must start a line of the file after which only blank lines follow. That refuses
    an offsets file from another seq file, offsets past the end and a count that disagrees with
    the number of lines (too many or too few at the end). A wrong offset in the middle is refused
    when its line is read: LineReader checks that each offset starts a line.
    """
    path = os.fspath(path)
    off = load_pickle(path)
    if isinstance(off, dict):
        entries = off.items()
    elif isinstance(off, (list, tuple)):
        entries = enumerate(off)
    else:
        raise DataError(f"{path}: a pickled {type(off).__name__}, expected a list of byte offsets "
                        f"(one per line of the seq file) or a dict re-id -> offset")
    for k, o in entries:
        if not isinstance(o, (int, np.integer)) or isinstance(o, bool) or o < 0:
            raise DataError(f"{path}: entry {k!r} is {o!r}, expected a non-negative int byte offset")
    off = sorted(int(o) for o in off.values()) if isinstance(off, dict) else [int(o) for o in off]
    for k in range(1, len(off)):
        if off[k] <= off[k - 1]:
            raise DataError(f"{path}: entry {k} (byte offset {off[k]}) is not after entry {k - 1} "
                            f"({off[k - 1]}), expected increasing offsets, one per line")
    if seq_path is None and path.endswith("_offsets.pkl"):
        seq_path = path[:-len("_offsets.pkl")] + ".jsonl"
    if seq_path is not None and os.path.isfile(seq_path):
        _check_offsets_cover(path, off, os.fspath(seq_path))
    return off


def _check_offsets_cover(path, off, seq):
    """The cheap load-time check of read_offsets: an O(1) look at the end of `seq`."""
    size = os.path.getsize(seq)
    if size == 0:
        raise DataError(f"{seq}: empty file, expected one JSON array of records per line")
    if not off:
        raise DataError(f"{path}: no offsets, but {seq} holds {size} bytes; expected one offset per line")
    n, last = len(off), off[-1]
    if last >= size:
        raise DataError(f"{path}: entry {n - 1} (byte offset {last}) is past the end of {seq} "
                        f"({size} bytes); is the offsets file from this seq file?")
    with open(seq, "rb") as f:
        f.seek(max(last - 1, 0))
        if last and f.read(1) != b"\n":
            raise DataError(f"{path}: entry {n - 1} (byte offset {last}) is not at a line start of "
                            f"{seq}; is the offsets file from this seq file?")
        f.readline()
        end = f.tell()
        while chunk := f.read(1 << 16):
            if chunk.strip():
                raise DataError(f"{path}: {n} offsets, but {seq} has more lines (the line at the "
                                f"last offset ends at byte {end} of {size}); expected one offset per line")


class DuplicateKey(ValueError):
    pass


def unique_pairs(pairs):
    """json object_pairs_hook: a dict, refusing a key given twice (json keeps the last silently)."""
    d = dict(pairs)
    if len(d) < len(pairs):
        seen = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def read_json(path, unique_keys=False):
    """One JSON document; unique_keys: an object giving a key twice is an error, not its last value."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=unique_pairs if unique_keys else None)
    except DuplicateKey as e:
        raise DataError(f"{path}: key {json.dumps(e.args[0])} appears twice in one object, expected each key "
                        f"once") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_item_feat_dict(path):
    """item_feat_dict.json: an object keyed by item re-id strings ("47086") whose values are
    feature dicts (null for an item without features). A key given twice (an item, or a feature
    of one item) is an error: plain JSON parsing would keep its last value silently. The check
    costs about half the parse time again (0.7 s per 300k items), once per run."""
    obj = read_json(path, unique_keys=True)
    if type(obj) is not dict:
        raise DataError(f"{path}: a JSON {json_type(obj)}, expected an object "
                        f"{{item re-id: {{feature_id: value}}}}")
    for k, fd in obj.items():
        if not (k.isascii() and k.isdigit()):
            raise DataError(f"{path}: key {json.dumps(k)} is not an item re-id, expected a "
                            f"decimal integer string like \"47086\"")
        check_feats(fd, path, f"item {json.dumps(k)}")
    return obj


def _json_error(where, e, expected):
    """DataError for a line json.loads refused (JSONDecodeError, UnicodeDecodeError, RecursionError)."""
    if isinstance(e, json.JSONDecodeError):
        why = f"{e.msg}, column {e.colno}"
    elif isinstance(e, UnicodeDecodeError):
        why = f"not UTF-8: {e.reason} at column {e.start + 1}"
    else:
        why = "nested too deeply"
    return DataError(f"{where}: invalid JSON ({why}), expected {expected}")


def iter_jsonl(path, unique_keys=False):
    """Yield (line_number, object) for each non-empty line of a JSON-lines file. unique_keys:
    an object that gives a key twice is an error (plain JSON parsing keeps the last value)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw, object_pairs_hook=unique_pairs) if unique_keys else json.loads(raw)
            except DuplicateKey as e:
                raise DataError(f"{path}:{lineno}: key {json.dumps(e.args[0])} appears twice in one object, "
                                f"expected each key once") from None
            except (ValueError, RecursionError) as e:
                raise _json_error(f"{path}:{lineno}", e, "one JSON value per line") from None
            yield lineno, obj



def json_type(v):
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def show_json(v):
    """A parsed JSON value as the file spells it, cut to 40 characters."""
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def check_feats(fd, where, what):
    """A feature dict: fid -> int, string (an unseen value at inference), a list of them, or null."""
    if fd is None:
        return
    if type(fd) is not dict:
        raise DataError(f"{where}: {what} is a JSON {json_type(fd)}, expected an object "
                        f"{{feature_id: value}} or null")
    for k, v in fd.items():
        t = type(v)
        if t is int or t is str or v is None or (t is list and all(type(x) in (int, str) for x in v)):
            continue
        raise DataError(f"{where}: {what} feature {json.dumps(k)} is {show_json(v)}, expected an int, "
                        f"a string or a list of them")


_FEAT_TYPES = frozenset((int, str, list, type(None)))


def _feats_ok(dicts):
    """check_feats' verdict for many dicts in one C-level pass (this runs for every sample)."""
    vals = list(itertools.chain.from_iterable(map(dict.values, dicts)))
    types = set(map(type, vals))
    if not _FEAT_TYPES.issuperset(types):
        return False
    return list not in types or {int, str}.issuperset(
        map(type, itertools.chain.from_iterable(v for v in vals if type(v) is list)))


def record_problem(r, rec, raw_user_ids=True):
    """Why record `r` does not fit the layout, as a message starting with `rec` ("record 3 of
    9"), or None when it fits. This is the one record check of the project (training, inference,
    CTR priors, evaluation baselines). It checks the six fields' types and ranges; feature dicts
    are check_feats' business. An item id's upper range is the caller's: a raw creative id is
    valid at inference. raw_user_ids: a user id may also be a raw string (inference files)."""
    if type(r) is not list:
        return f"{rec} is a JSON {json_type(r)}, expected a 6-element array {RECORD_LAYOUT}"
    if len(r) != 6:
        return f"{rec} has {len(r)} elements, expected 6 {RECORD_LAYOUT}"
    u, item, _, _, act, ts = r
    if not ((type(u) is int and 0 <= u <= MAX_ID) or (raw_user_ids and type(u) is str and u)):
        return (f"{rec}: user_id is {show_json(u)}, expected a non-negative int (re-id)"
                + (" or a non-empty string (raw id)" if raw_user_ids else " below 2^63"))
    if type(ts) is not int or not 0 <= ts <= MAX_ID:
        return f"{rec}: timestamp is {show_json(ts)}, expected a non-negative int (Unix seconds)"
    if item is not None and (type(item) is not int or not 0 <= item <= MAX_ID):
        return f"{rec}: item_id is {show_json(item)}, expected a non-negative int or null (profile record)"
    if act is not None and (type(act) is not int or act not in (0, 1, 2)):
        return f"{rec}: action_type is {show_json(act)}, expected 0, 1, 2 or null"
    return None


def parse_user_records(records, where):
    """Split one user's line into (user_key, user_feat, events).

    events: list of (item, item_feat, action, ts) in time order (stable sort by timestamp); a
    null action is an exposure. The profile record's timestamp is dropped here on purpose: it is
    written after the target and would leak its timing. Every record passes record_problem and
    every feature dict check_feats; records are numbered from 1 in messages.
    """
    if type(records) is not list:
        raise DataError(f"{where}: the line is a JSON {json_type(records)}, expected a JSON array of "
                        f"records {RECORD_LAYOUT}")
    if not records:
        raise DataError(f"{where}: empty array, expected at least one record {RECORD_LAYOUT}")
    user, user_feat, events, feats, n = None, None, [], [], len(records)
    for j, r in enumerate(records, 1):
        rec = f"record {j} of {n}"
        msg = record_problem(r, rec)
        if msg is not None:
            raise DataError(f"{where}: {msg}")
        u, item, uf, itf, act, ts = r
        if user is None:
            user = u
        if item is None:
            check_feats(uf, where, f"{rec}: user_feat")
            user_feat = uf or user_feat
            continue
        if itf is not None:
            if type(itf) is not dict:
                check_feats(itf, where, f"{rec}: item_feat")
            feats.append((rec, itf))
        events.append((item, itf, 0 if act is None else act, ts))
    if not _feats_ok(fd for _, fd in feats):
        for rec, fd in feats:
            check_feats(fd, where, f"{rec}: item_feat")
    events.sort(key=lambda e: e[3])
    return user, user_feat, events



class LineReader:
    """Random access to lines of a JSON-lines file by the offsets pickle; one handle per process."""

    def __init__(self, path, offsets):
        self.path, self.offsets = os.fspath(path), offsets
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: file not found")
        self.size = os.path.getsize(self.path)
        self._fh, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def line_bytes(self):
        """Bytes per line (up to the next offset, the last to the end of the file): a proxy for
        each user's number of events that costs no read."""
        return np.diff(np.append(np.asarray(self.offsets, np.int64), self.size))

    def __getitem__(self, i):
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        off, where = self.offsets[i], f"{self.path}:{i + 1}"
        if off >= self.size:
            raise DataError(f"{where}: byte offset {off} is past the end of the file ({self.size} "
                            f"bytes); is the offsets file from this seq file?")
        # one byte more per read: the offset must follow a newline (or be 0)
        self._fh.seek(max(off - 1, 0))
        if off and self._fh.read(1) != b"\n":
            raise DataError(f"{where}: byte offset {off} is not at a line start (the byte before it "
                            f"is not a newline); is the offsets file from this seq file?")
        raw = self._fh.readline()
        if not raw.strip():
            raise DataError(f"{where}: empty line at byte offset {off}, expected a JSON array of records")
        try:
            return json.loads(raw), where
        except (ValueError, RecursionError) as e:
            raise _json_error(where, e, "a JSON array of records") from None


def with_location(where, fn, *args):
    """Call fn; a DataError it raises without a location gets `where` (file:line) in front."""
    try:
        return fn(*args)
    except DataError as e:
        if str(e).startswith(where.rsplit(":", 1)[0]):
            raise
        raise DataError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Multimodal vectors (creative_emb/): read here, torch-free, for dataset.py and precompute_sid.py
# ---------------------------------------------------------------------------------------------

def mm_sources(emb_dir: str, fid: str) -> list:
    """Files holding feature `fid`: emb_{fid}_*.pkl and/or emb_{fid}_*/ Spark shards."""
    out = []
    if os.path.isdir(emb_dir):
        for name in sorted(os.listdir(emb_dir)):
            if not name.startswith(f"emb_{fid}_"):
                continue
            p = os.path.join(emb_dir, name)
            if os.path.isdir(p):
                out += [os.path.join(p, s) for s in sorted(os.listdir(p))
                        if s.startswith("part-") or s.endswith(".json")]
            elif name.endswith(".pkl"):
                out.append(p)
    return out


def _mm_cid(cid, where):
    """A creative id key: an int, or its decimal string (pickled dicts from some converters)."""
    if isinstance(cid, str) and cid.isascii() and cid.isdigit():
        return int(cid)
    if not isinstance(cid, (int, np.integer)) or isinstance(cid, bool) or cid < 0:
        raise DataError(f"{where}: creative id {show_json(cid)} is not a non-negative int")
    return int(cid)


def _mm_vector(vec, where):
    """A vector as flat float32: a non-empty list (or numpy array) of numbers."""
    try:
        a = np.asarray(vec) if isinstance(vec, (list, np.ndarray)) else None
    except ValueError:                       # ragged nested lists
        a = None
    if a is None or a.ndim == 0 or a.size == 0 or a.dtype.kind not in "fiu":
        raise DataError(f"{where}: emb is {show_json(vec)}, expected a non-empty list of numbers")
    return a.astype(np.float32).reshape(-1)


def iter_mm_vectors(emb_dir: str, fid: str):
    """Yield (creative_id, float32 vector, where) for feature `fid`, whichever form it is stored in."""
    for src in mm_sources(emb_dir, fid):
        if src.endswith(".pkl"):
            table = load_pickle(src)
            if not isinstance(table, dict):
                raise DataError(f"{src}: a pickled {type(table).__name__}, expected a dict "
                                f"creative_id -> vector")
            for cid, vec in table.items():
                cid = _mm_cid(cid, src)
                where = f"{src}: creative id {cid}"
                yield cid, _mm_vector(vec, where), where
            continue
        for lineno, obj in iter_jsonl(src):
            where = f"{src}:{lineno}"
            if type(obj) is not dict or "anonymous_cid" not in obj or "emb" not in obj:
                raise DataError(f"{where}: expected an object {{\"anonymous_cid\": <int>, \"emb\": [floats]}}")
            yield _mm_cid(obj["anonymous_cid"], where), _mm_vector(obj["emb"], where), where
