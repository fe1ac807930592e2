"""Faults of the third reliability round (issue 21): runs sharing a folder, work interrupted by a
kill, stop signals, inputs that disagree with each other, and paths that look like patterns.

Concurrency is made deterministic by injecting the interleaving: the test takes a folder's lock
itself (layout.own_folder) and checks what a second caller does; a caller that waits is seen
waiting through the blocking flock call it makes, never by sleeping. A kill at a chosen point is
an exception no cleanup handler catches (Killed) raised from a patched function, or a real
signal sent once the process printed a marker. CASES counts the cases per class.
"""
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import layout as L  # noqa: E402

PY = sys.executable
TINY = ["--num_epochs", "1", "--num_workers", "0", "--hidden_units", "16", "--feat_dim", "8", "--num_blocks", "1",
        "--maxlen", "10", "--batch_size", "16", "--num_neg", "8"]


class Killed(BaseException):
    """A kill at this point: no `except Exception` or `except OSError` handler runs."""


def put(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def env_for(data, tmp, ckpt="ck", **over):
    return {"TRAIN_DATA_PATH": str(data / "train"), "EVAL_DATA_PATH": str(data / "eval"),
            "USER_CACHE_PATH": str(tmp / "cache"), "TRAIN_LOG_PATH": str(tmp / "log"),
            "TRAIN_TF_EVENTS_PATH": str(tmp / "tb"), "TRAIN_CKPT_PATH": str(tmp / ckpt),
            "MODEL_OUTPUT_PATH": str(tmp / ckpt), "EVAL_RESULT_PATH": str(tmp / "result"), **over}


def train_here(argv, env, monkeypatch):
    """main.main in this process with `env`; its signal handlers are put back afterwards."""
    import main
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return main.main(argv)
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import make_demo_data
    out = tmp_path_factory.mktemp("faults") / "data"
    assert make_demo_data.main(["--out", str(out), "--users", "60", "--items", "80", "--eval_users", "10"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished tiny run: (its folder of run outputs, its checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        train_here(TINY, env_for(data, tmp), mp)
    return tmp, tmp / "ck"


@contextlib.contextmanager
def held(folder):
    """The lock of `folder`, held by this test process as another run would hold it."""
    with L.own_folder(folder, "TEST"):
        yield


class WaitSeen:
    """Patches fcntl.flock as layout uses it: a blocking request (a caller about to wait) sets
    `waiting` before it blocks, so the test knows the other caller is waiting, without a sleep."""

    def __init__(self, monkeypatch):
        self.waiting, real = threading.Event(), fcntl.flock

        def flock(fd, op):
            if op == fcntl.LOCK_EX:
                self.waiting.set()
            return real(fd, op)
        monkeypatch.setattr(L.fcntl, "flock", flock)


def in_thread(fn, *args):
    """Run fn in a thread -> (thread, result dict with 'value' or 'error')."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:       # noqa: B902 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


# ---------------------------------------------------------------------------------------------
# 1. Runs sharing a folder: refuse (checkpoints, CTR without --reuse, results) or wait (caches)
# ---------------------------------------------------------------------------------------------

def test_lock_names_its_holder_and_is_free_again_after_release(tmp_path):
    folder = tmp_path / "f"
    with held(folder):
        with pytest.raises(L.Busy) as e:
            with L.own_folder(folder, "TRAIN_CKPT_PATH"):
                pass
        assert str(e.value) == (f"{folder}: in use by another run (pid {os.getpid()}: {L.command_line()}); wait for "
                                f"it to end or use another TRAIN_CKPT_PATH")
    with L.own_folder(folder, "TRAIN_CKPT_PATH"):
        pass
    assert json.loads((folder / ".lock").read_text()) == {"pid": os.getpid(), "command": L.command_line()}


def test_lock_of_a_killed_holder_is_released_by_the_kernel(tmp_path):
    """A holder killed with SIGKILL (no cleanup runs) leaves its lock file, but no lock."""
    folder = tmp_path / "f"
    code = ("import sys, layout; cm = layout.own_folder(sys.argv[1], 'X'); cm.__enter__(); print('held', flush=True); "
            "sys.stdin.read()")
    p = subprocess.Popen([PY, "-c", code, str(folder)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline() == "held\n"
        with pytest.raises(L.Busy, match=rf"\(pid {p.pid}: -c {re.escape(str(folder))}\)"):
            with L.own_folder(folder, "X"):
                pass
    finally:
        p.kill()
        p.wait()
    with L.own_folder(folder, "X"):
        pass


def test_training_refuses_a_checkpoint_folder_another_run_holds(data, tmp_path):
    """Through the real command line: exit 2, one line naming the holder; nothing written."""
    e = env_for(data, tmp_path)
    with held(tmp_path / "ck"):
        p = subprocess.run([PY, "main.py", *TINY], cwd=ROOT, env={**os.environ, **e}, capture_output=True, text=True,
                           timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr == (f"error: {tmp_path / 'ck'}: in use by another run (pid {os.getpid()}: {L.command_line()}); "
                        f"wait for it to end or use another TRAIN_CKPT_PATH\n")
    assert sorted(q.name for q in (tmp_path / "ck").iterdir()) == [".lock"]


def test_inference_refuses_a_result_folder_another_run_holds(trained, data, tmp_path, monkeypatch):
    import infer
    for k, v in env_for(data, tmp_path, MODEL_OUTPUT_PATH=str(trained[1])).items():
        monkeypatch.setenv(k, v)
    put(tmp_path / "result/result.json", "earlier")
    with held(tmp_path / "result"):
        with pytest.raises(L.Busy, match=r"result: in use by another run .*use another EVAL_RESULT_PATH$"):
            infer.infer(argv=["--num_workers", "0"])
    assert (tmp_path / "result/result.json").read_text() == "earlier"


def _ctr_args(data, out, *extra):
    return ["--seq_path", str(data / "train/seq.jsonl"), "--output_dir", str(out), "--prior", "1,3", *extra]


def test_ctr_refuses_a_held_folder_and_with_reuse_waits_then_reuses(data, tmp_path, monkeypatch, capsys):
    import precompute_ctr as P
    out = tmp_path / "ctr"
    with held(out):
        with pytest.raises(L.Busy, match=r"ctr: in use by another run .*use another --output_dir$"):
            P.main(_ctr_args(data, out))
    counts, real_count = [], P.count_events
    monkeypatch.setattr(P, "count_events", lambda *a, **k: counts.append(1) or real_count(*a, **k))
    seen = WaitSeen(monkeypatch)
    with held(out):
        t, res = in_thread(P.main, _ctr_args(data, out, "--reuse"))
        assert seen.waiting.wait(60)
        P.run(P.get_args(_ctr_args(data, out, "--reuse")))        # the holder's work
    t.join(60)
    assert "error" not in res, res
    assert len(counts) == 1                                         # the waiter counted nothing
    said = capsys.readouterr().out
    assert f"notice: {out} (--output_dir) is in use by another run (pid {os.getpid()}" in said
    assert said.rstrip().endswith(f"{out}: up to date with {data / 'train/seq.jsonl'}; nothing to do")


def _mm_source(d, vectors):
    L.dump_pickle({cid: np.asarray(v, np.float32) for cid, v in vectors.items()}, d / "emb_81_2.pkl")
    return str(d)


def test_mm_cache_build_waits_for_the_builder_then_reuses(tmp_path, monkeypatch):
    import dataset as D
    src = _mm_source(tmp_path / "a", {10: [1, 2], 11: [3, 4]})
    ids = {10: 1, 11: 2}
    passes, real = [], D.iter_mm_vectors
    monkeypatch.setattr(D, "iter_mm_vectors", lambda *a: passes.append(1) or real(*a))
    seen = WaitSeen(monkeypatch)
    with held(tmp_path / "cache/mm"):
        t, res = in_thread(D.build_mm_cache, src, "81", ids, 2, str(tmp_path / "cache"))
        assert seen.waiting.wait(60)
        D._mm_cache(src, "81", ids, 2, str(tmp_path / "cache/mm"))  # the holder builds it
    t.join(60)
    assert len(passes) == 2                                          # the holder's two passes; the waiter reused
    table, meta = res["value"]
    assert table.tolist() == [[0, 0], [1, 2], [3, 4]] and meta["mask"].tolist() == [False, True, True]


# ---------------------------------------------------------------------------------------------
# 2. Interrupted work: recover (complete or sweep) at the next start
# ---------------------------------------------------------------------------------------------

NAMES = ("query.fbin", "embedding.fbin", "result.json")


def _staged_set(folder):
    import infer
    out = infer.OutputSet(str(folder))
    out.claim()
    for n in NAMES:
        out.write(n, lambda p, n=n: put(p, f"{n} new"))
    return out


def test_inference_killed_between_renames_is_completed_by_the_next_run(tmp_path, monkeypatch, capsys):
    import infer
    folder = tmp_path / "result"
    for n in NAMES:
        put(folder / n, f"{n} old")
    out = _staged_set(folder)
    real, renames = os.replace, []

    def replace(src, dst):
        if not str(dst).endswith(L.PUBLISH_JOURNAL):
            renames.append(dst)
            if len(renames) == 2:
                raise Killed()
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        out.publish()
    out._owner.close()                                    # the kernel releases a killed run's lock
    monkeypatch.setattr(os, "replace", real)
    assert [(folder / n).read_text() for n in NAMES] == ["query.fbin new", "embedding.fbin old", "result.json old"]
    nxt = infer.OutputSet(str(folder))
    nxt.claim()
    nxt.close()
    assert {q.name: q.read_text() for q in folder.iterdir() if q.name != ".lock"} == {n: f"{n} new" for n in NAMES}
    assert capsys.readouterr().err == (f"notice: {folder}: an earlier run was stopped while publishing its outputs; "
                                       f"completed it (2 of 3 files renamed now), so the folder holds that run's "
                                       f"whole set\n")


def test_inference_killed_while_staging_leaves_the_earlier_set_and_its_files_are_swept(tmp_path):
    import infer
    folder = tmp_path / "result"
    for n in NAMES:
        put(folder / n, f"{n} old")
    out = _staged_set(folder)
    out._owner.close()                                    # killed before publish: staged files stay behind
    assert len(list(folder.glob(".*.staged.tmp"))) == 3
    nxt = infer.OutputSet(str(folder))
    nxt.claim()
    nxt.close()
    assert {q.name: q.read_text() for q in folder.iterdir() if q.name != ".lock"} == {n: f"{n} old" for n in NAMES}


def test_publish_journal_that_cannot_be_completed_removes_the_set(tmp_path, capsys):
    folder = tmp_path / "result"
    for n in NAMES:
        put(folder / n, f"{n} x")
    L.dump_json({"files": [[f".{n}.1.staged.tmp", n, 999] for n in NAMES]}, folder / L.PUBLISH_JOURNAL)
    assert L.finish_publish(folder) == 0
    assert list(folder.iterdir()) == []
    assert "its set cannot be completed; removed its files" in capsys.readouterr().out


def test_mm_rebuild_killed_midway_leaves_no_index_vouching_for_new_vectors(tmp_path, monkeypatch, capsys):
    import dataset as D
    cache = str(tmp_path / "cache")
    a = _mm_source(tmp_path / "a", {10: [1, 2], 11: [3, 4]})
    b = _mm_source(tmp_path / "b", {10: [5, 6], 11: [7, 8]})
    ids = {10: 1, 11: 2}
    D.build_mm_cache(a, "81", ids, 2, cache)
    real = np.save
    monkeypatch.setattr(D.np, "save", lambda *args, **kw: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):                         # killed after the new table, before mask and index
        D.build_mm_cache(b, "81", ids, 2, cache)
    monkeypatch.setattr(D.np, "save", real)
    assert not (tmp_path / "cache/mm/emb_81.index.json").exists()
    table, _ = D.build_mm_cache(a, "81", ids, 2, cache)       # data a again: rebuilt, not b's vectors
    assert table.tolist() == [[0, 0], [1, 2], [3, 4]]
    # a table replaced behind its index's back is not trusted either
    np.save(tmp_path / "cache/mm/emb_81.npy", np.full((3, 2), 9, np.float32))
    capsys.readouterr()
    table, _ = D.build_mm_cache(a, "81", ids, 2, cache)
    assert table.tolist() == [[0, 0], [1, 2], [3, 4]]
    assert "its table files are not those it indexed" in capsys.readouterr().out


def test_mm_temp_file_of_a_killed_build_is_swept(tmp_path):
    import dataset as D
    put(tmp_path / "cache/mm/.emb_81.npy.4242.tmp", "x" * 100)
    D.build_mm_cache(_mm_source(tmp_path / "a", {10: [1, 2]}), "81", {10: 1}, 1, str(tmp_path / "cache"))
    assert not (tmp_path / "cache/mm/.emb_81.npy.4242.tmp").exists()


def test_checkpoint_temp_files_are_swept_at_start(tmp_path, capsys):
    import checkpoint as C
    root = tmp_path / "ck"
    put(root / "global_step2/model.pt", "weights")
    put(root / "global_step2/meta.json", "{}")
    put(root / "global_step3/.model.pt.ab12.tmp", "x" * 2048)     # a save killed before its meta.json
    put(root / ".best.json.cd34.tmp", "{")
    C.sweep(str(root))
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "global_step2", "global_step2/meta.json", "global_step2/model.pt"]
    assert capsys.readouterr().out == (f"notice: {root}: removed 2 temporary file(s) (0.0 MiB) left by an "
                                       f"interrupted save\n")


def test_ctr_killed_before_its_meta_leaves_no_meta_vouching_for_new_tables(data, tmp_path, monkeypatch):
    import dataset as D
    import precompute_ctr as P
    out = tmp_path / "ctr"
    P.main(_ctr_args(data, out))
    real = P.dump_json

    def dump(obj, path, **kw):
        if str(path).endswith(P.ITEM_POP_FILE):
            raise Killed()
        return real(obj, path, **kw)
    monkeypatch.setattr(P, "dump_json", dump)
    with pytest.raises(Killed):
        P.main(_ctr_args(data, out, "--prior", "2,5"))
    assert not (out / P.META_FILE).exists() and D.find_ctr_dir(str(out)) is None
    monkeypatch.setattr(P, "dump_json", real)
    assert not P.up_to_date(P.get_args(_ctr_args(data, out, "--reuse")))


def test_killed_demo_build_does_not_block_the_next(tmp_path, monkeypatch):
    import make_demo_data as M
    out = tmp_path / "demo"
    args = ["--out", str(out), "--users", "30", "--items", "40", "--eval_users", "5"]

    def killed(a):
        put(out / "train/seq.jsonl", "[]\n")
        raise Killed()
    real = M.generate
    monkeypatch.setattr(M, "generate", killed)
    with pytest.raises(Killed):
        M.main(args)
    monkeypatch.setattr(M, "generate", real)
    assert M.main(args) == 0
    assert "building" not in json.loads((out / "demo_meta.json").read_text())
    assert (out / "train/seq.jsonl").read_text() != "[]\n"


# ---------------------------------------------------------------------------------------------
# 5. Paths are data; a folder holding another, finished run
# ---------------------------------------------------------------------------------------------

def test_checkpoint_folder_named_like_a_glob_pattern(data, tmp_path, monkeypatch, capsys):
    """ck[1]: resume, rotation and the another-run check all see its checkpoints."""
    e = env_for(data, tmp_path, ckpt="ck[1]")
    root = tmp_path / "ck[1]"
    train_here([*TINY, "--ckpt_every_steps", "1", "--keep_last_ckpts", "1"], e, monkeypatch)
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("global_step"))
    assert 1 <= len(steps) <= 2                          # rotated: the newest (and the best)
    capsys.readouterr()
    train_here([*TINY, "--ckpt_every_steps", "1", "--keep_last_ckpts", "1"], e, monkeypatch)
    assert "this run already finished" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("global_step")) == steps
    with pytest.raises(L.DataError, match=r"holds checkpoints of another run"):
        train_here([*TINY, "--resume", "none"], e, monkeypatch)


def test_new_flags_into_a_folder_of_a_finished_run_are_refused(trained, data, monkeypatch):
    tmp, ck = trained
    with pytest.raises(L.DataError) as e:
        train_here([*TINY, "--hidden_units", "8"], env_for(data, tmp), monkeypatch)
    assert re.fullmatch(rf"{re.escape(str(ck))}/global_step\d+: holds another run, finished, trained with other "
                        rf"settings \(hidden_units 8 here, 16 there\); use another TRAIN_CKPT_PATH for a run with "
                        rf"these flags", str(e.value)), str(e.value)


# ---------------------------------------------------------------------------------------------
# 3. Stop signals: one line, exit 128 + N, no traceback, no process left behind
# ---------------------------------------------------------------------------------------------

# infer.py as the harness runs it, with its DataLoader worker held in its first batch: the worker
# prints a marker, then blocks; the signal is sent once the marker is read
INFER_HELD = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import dataset_packed as P
def held(self, i):
    print(f"worker {os.getpid()} in a batch", flush=True)
    time.sleep(3600)
P.PredictSeqDataset.__getitem__ = held
import infer, layout
sys.argv = ["infer.py"]
layout.run_cli(infer.main, stop_grace_s=infer.STOP_GRACE_S)
"""


def _default_stop_signals():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])


def alive(pid):
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def gone(pids, guard=60):
    """Wait (a guard, not a timing assertion) for processes that are being taken down."""
    end = time.time() + guard
    while any(alive(p) for p in pids) and time.time() < end:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("sig, group, code", [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130),
                                              (signal.SIGKILL, False, -9)])
def test_inference_stopped_by_a_signal(trained, data, tmp_path, sig, group, code):
    """SIGTERM from a harness, Ctrl-C (the whole group) and SIGKILL during the user export: the
    run ends with "stopped by SIG..." and 128 + N (SIGKILL: killed outright), no traceback, no
    output published, and its DataLoader worker does not outlive it."""
    e = {**os.environ, **env_for(data, tmp_path, MODEL_OUTPUT_PATH=str(trained[1]))}
    put(tmp_path / "result/result.json", "earlier")
    # as from a terminal: a test run started in the background (`cmd &` without job control)
    # ignores SIGINT, and a child inherits an ignored signal, so Ctrl-C would never reach it
    p = subprocess.Popen([PY, "-c", INFER_HELD], cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, preexec_fn=_default_stop_signals)
    try:
        line = p.stdout.readline()
        while line and not line.endswith(" in a batch\n"):
            line = p.stdout.readline()
        assert line, p.communicate()
        worker = int(line.split()[1])
        (os.killpg if group else os.kill)(p.pid, sig)
        out, err = p.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, err
    assert "Traceback" not in err, err
    if code > 0:
        assert err.splitlines()[-1].startswith(f"stopped by {sig.name}"), err
    assert gone([worker]), f"worker {worker} outlived infer.py"
    assert (tmp_path / "result/result.json").read_text() == "earlier"
    assert not [q for q in (tmp_path / "result").iterdir() if q.name.endswith(".tmp")]


FORKER = """
import multiprocessing, sys, time
sys.path.insert(0, sys.argv[1])
import layout
if sys.argv[2] == "hook":
    layout.children_die_with_me()
p = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
p.start()
print(p.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("hook", [True, False])
def test_a_forked_child_dies_with_a_killed_parent_before_its_init(hook):
    """A child forked after children_die_with_me() dies with its SIGKILLed parent though it never
    ran a worker init (the window a DataLoader worker forked just before the kill is in); without
    the hook the same child lives on, so the check can fail."""
    p = subprocess.Popen([PY, "-c", FORKER, str(ROOT), "hook" if hook else "none"], stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        child = int(p.stdout.readline())
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        assert gone([child], guard=10 if hook else 1) == hook
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def test_a_worker_prints_no_connection_error_once_its_parent_is_gone(monkeypatch, capsys):
    """A DataLoader worker's excepthook: a connection error (the resource sharer's socket to a
    SIGKILLed main process) prints nothing once the parent is gone; with the parent alive, and for
    any other error, the traceback is printed as before."""
    def raised(exc):
        try:
            raise exc
        except Exception:
            return sys.exc_info()

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    for parent_gone in (False, True):
        parent = os.getppid() + (1 if parent_gone else 0)         # another pid: getppid() says it is gone
        hook = L._quiet_when_orphaned(parent, wait_s=0.05)
        for exc in (EOFError("eof"), ConnectionResetError("reset"), ValueError("other")):
            hook(*raised(exc))
            err = capsys.readouterr().err
            printed = not parent_gone or isinstance(exc, ValueError)
            assert (f"{type(exc).__name__}: {exc}" in err and "Traceback" in err) == printed, (parent_gone, exc, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_training_stopped_by_a_signal(data, tmp_path, sig):
    """SIGTERM to main.py once it checkpoints (its worker running): a checkpoint, one line, 143;
    SIGKILL: the worker dies with it, and the checkpoint folder is free at once (the lock went
    with the process)."""
    e = {**os.environ, **env_for(data, tmp_path)}
    cmd = [PY, "main.py", *TINY, "--num_workers", "1", "--num_epochs", "8", "--ckpt_every_steps", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        end = time.time() + 300            # a guard against a hang, not a timed assertion
        while not (list((tmp_path / "ck").glob("global_step*/meta.json")) and children(p.pid)):
            assert p.poll() is None and time.time() < end, p.communicate()
            time.sleep(0.05)
        workers = children(p.pid)
        os.kill(p.pid, sig)
        out, err = p.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert "Traceback" not in err, err
    assert gone(workers), f"workers {workers} outlived main.py"
    if sig == signal.SIGKILL:
        assert p.returncode == -9
        with L.own_folder(tmp_path / "ck", "TRAIN_CKPT_PATH"):
            pass
        return
    assert p.returncode == 143, err
    saved = re.fullmatch(r"stopped by SIGTERM: saved (\S+); rerun the same command to continue\n", err)
    assert saved and (Path(saved.group(1)) / "meta.json").exists(), err


# ---------------------------------------------------------------------------------------------
# 4. Inputs checked against each other: refuse (one line) or a notice with the count
# ---------------------------------------------------------------------------------------------

def _copy_train(data, tmp):
    import shutil
    shutil.copytree(data / "train", tmp / "train")
    return tmp / "train"


def _rewrite_offsets(seq):
    import pickle
    off, pos = [], 0
    for line in Path(seq).read_bytes().splitlines(keepends=True):
        off.append(pos)
        pos += len(line)
    Path(str(seq)[:-len(".jsonl")] + "_offsets.pkl").write_bytes(pickle.dumps(off))


def test_feature_values_written_as_digit_strings_are_counted_in_one_notice(data, tmp_path, capsys):
    import dataset as D
    train = _copy_train(data, tmp_path)
    feats = json.loads((train / "item_feat_dict.json").read_text())
    changed = []
    for k in sorted(feats, key=int)[:5]:
        fid = next(f for f, v in feats[k].items() if type(v) is int)
        feats[k][fid] = str(feats[k][fid])
        changed.append((k, fid, feats[k][fid]))
    (train / "item_feat_dict.json").write_text(json.dumps(feats))
    D.load_train_data(str(train), D.DataConfig(maxlen=10, mm_emb_id=[]), str(tmp_path / "cache"))
    lines = capsys.readouterr().out.splitlines()
    k, fid, v = changed[0]
    want = (f"notice: {train}: 5 feature values are digit strings (5 in item_feat_dict.json, 0 in the first 60 "
            f"profiles; first: item {k} feature {fid!r}: {v!r}); a string is read as a value unseen in training (0), "
            f"not as a number: write re-ids as JSON numbers")
    assert [ln for ln in lines if "digit strings" in ln] == [want]


def test_a_user_on_two_lines_of_the_training_data_is_refused(data, tmp_path):
    import dataset as D
    train = _copy_train(data, tmp_path)
    seq = train / "seq.jsonl"
    lines = seq.read_text().splitlines()
    user = json.loads(lines[2])[0][0]
    seq.write_text("\n".join(lines + [lines[2]]) + "\n")
    _rewrite_offsets(seq)
    with pytest.raises(L.DataError) as e:
        D.load_train_data(str(train), D.DataConfig(maxlen=10, mm_emb_id=[]), str(tmp_path / "cache"))
    assert str(e.value) == (f"{seq}: 1 line(s) repeat a user of an earlier line ({len(lines)} users on "
                            f"{len(lines) + 1} lines; first: user {user} on lines 3 and {len(lines) + 1}); expected "
                            f"one line per user: merge each user's records into one line")


def test_resume_with_another_batch_size_is_refused(trained, data, tmp_path, monkeypatch):
    import shutil

    import checkpoint as C
    shutil.copytree(trained[1], tmp_path / "ck")
    last = C.newest(str(tmp_path / "ck"))
    meta = json.loads(Path(last, "meta.json").read_text())
    meta.pop("done")                          # a run stopped before its end, as a kill leaves it
    Path(last, "meta.json").write_text(json.dumps(meta))
    i = TINY.index("--batch_size")
    argv = [*TINY[:i], "--batch_size", "8", *TINY[i + 2:]]
    with pytest.raises(L.DataError) as e:
        train_here(argv, env_for(data, tmp_path), monkeypatch)
    assert str(e.value) == (f"{last}: this run was checkpointed with --batch_size 16, not 8; resuming with another "
                            f"would skip or repeat users of the epoch and move the LR schedule: resume with "
                            f"--batch_size 16, or use another TRAIN_CKPT_PATH for a run with 8")


def _valid_with_unknown_users(data, tmp, n_unknown, items_unknown=False):
    import shutil
    v = tmp / "valid"
    shutil.copytree(data / "eval", v)
    rows = [json.loads(x) for x in (v / "ground_truth.jsonl").read_text().splitlines()]
    for j, r in enumerate(rows):
        if j < n_unknown:
            r["user_id"] = f"nobody_{j}"
        if items_unknown:
            r["creative_id"] = 10**12 + j
    (v / "ground_truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    known_items = L.load_pickle(data / "train/indexer.pkl")["i"]
    return v, len(rows), sum(r["creative_id"] in known_items for r in rows)


def test_a_validation_folder_from_another_dataset_is_refused(data, tmp_path, monkeypatch):
    v, n, ki = _valid_with_unknown_users(data, tmp_path, 10**6, items_unknown=True)
    with pytest.raises(L.DataError) as e:
        train_here([*TINY, "--valid_dir", str(v)], env_for(data, tmp_path), monkeypatch)
    assert str(e.value) == (f"{v}: only 0 of {n} validation users and {ki} of {n} target items are known to the "
                            f"training data ({data / 'train'}); below 20% validation cannot pick a checkpoint: is "
                            f"--valid_dir from another dataset?")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").glob("global_step*"))


def test_a_validation_folder_with_many_unknown_users_gets_a_notice(data, tmp_path, monkeypatch, capsys):
    import training
    v, n, ki = _valid_with_unknown_users(data, tmp_path, 6)
    assert min(n - 6, ki) / n < training.VALID_KNOWN_WARN
    train_here([*TINY, "--valid_dir", str(v)], env_for(data, tmp_path), monkeypatch)
    assert (f"notice: {v}: only {n - 6} of {n} validation users and {ki} of {n} target items are known to the training "
            f"data ({data / 'train'}); the unknown ones score as cold users and items") in capsys.readouterr().out


def test_an_eval_indexer_that_disagrees_with_the_training_one_loses(data, tmp_path, capsys):
    import validation as V
    train, ev = data / "train", tmp_path / "eval"
    ev.mkdir()
    ix = L.load_pickle(train / "indexer.pkl")
    a, b = sorted(ix["i"])[:2]
    swapped = {**ix, "i": {**ix["i"], a: ix["i"][b], b: ix["i"][a]}}
    L.dump_pickle(swapped, ev / "indexer.pkl")
    assert V.pick_indexer(str(ev), str(train)) == ix
    assert capsys.readouterr().err == (f"notice: {ev / 'indexer.pkl'} maps 2 of {len(ix['i'])} shared creative ids to "
                                       f"other re-ids than {train / 'indexer.pkl'}; using the training folder's: the "
                                       f"checkpoint's rows follow it\n")
    more = {**ix, "u": {**ix["u"], "a_new_user": 10**6}}      # more ids, none in conflict: the eval one serves
    L.dump_pickle(more, ev / "indexer.pkl")
    assert V.pick_indexer(str(ev), str(train)) == more and capsys.readouterr().err == ""


def test_millisecond_timestamps_are_refused(data, tmp_path):
    import dataset as D
    train = _copy_train(data, tmp_path)
    seq = train / "seq.jsonl"
    lines = seq.read_text().splitlines()
    recs = json.loads(lines[0])
    for r in recs:
        r[5] *= 1000
    lines[0] = json.dumps(recs)
    seq.write_text("\n".join(lines) + "\n")
    _rewrite_offsets(seq)
    cfg, table, builder, seq_path, offsets = D.load_train_data(str(train), D.DataConfig(maxlen=10, mm_emb_id=[]),
                                                               str(tmp_path / "cache"))
    ds = D.SeqDataset(seq_path, offsets, builder)
    newest = max(r[5] for r in recs if r[1] is not None)
    with pytest.raises(L.DataError) as e:
        ds[0]
    assert str(e.value) == (f"{seq}:1: timestamp {newest} is after the year 5000 as Unix seconds: milliseconds? "
                            f"expected Unix seconds like the training data (divide by 1000)")
    ds[1]                                              # seconds, as before


def test_hard_negative_cache_of_other_data_is_set_aside(tmp_path):
    import objectives as O
    seq, other, path = tmp_path / "seq.jsonl", tmp_path / "other.jsonl", tmp_path / "hn.pkl"
    put(seq, "[[1, 2, null, null, 1, 1700000000]]\n")
    put(other, "[[1, 3, null, null, 1, 1700000000], [1, 4, null, null, 0, 1700000001]]\n")
    said = []
    first = O.HardNegativeCache(str(path), 2, 10, 5, str(seq), 80, said.append)
    first.items = {7: [3, 4]}
    first.save()
    assert O.HardNegativeCache(str(path), 2, 10, 5, str(seq), 80, said.append).items == {7: [3, 4]} and said == []
    for source, n in ((other, 80), (seq, 81)):
        assert O.HardNegativeCache(str(path), 2, 10, 5, str(source), n, said.append).items == {}
        assert said.pop() == (f"notice: {path} was built from other data than {source} (80 items, now {n}, or the "
                              f"sequence file changed): starting a new one")
    L.dump_pickle({7: [3, 4]}, path)            # the earlier format: no record of its data
    assert O.HardNegativeCache(str(path), 2, 10, 5, str(seq), 80, said.append).items == {}
    assert said == [f"notice: {path} records no data it was built from (an older cache): starting a new one"]


def test_an_eval_item_file_without_features_does_not_strip_the_candidates(tmp_path, capsys):
    import validation as V
    train, ev = tmp_path / "train", tmp_path / "eval"
    put(train / "item_feat_dict.json", json.dumps({"1": {"100": 5}, "2": {"100": 6}, "3": {"100": 7}}))
    put(ev / "item_feat_dict.json", json.dumps({"1": {}, "2": None, "3": {"100": 9}, "4": {"100": 1}, "5": None}))
    assert V.pick_item_features(str(ev), str(train)) == {"1": {"100": 5}, "2": {"100": 6}, "3": {"100": 9},
                                                         "4": {"100": 1}, "5": None}
    assert capsys.readouterr().err == (f"notice: {ev / 'item_feat_dict.json'} lists 2 item(s) without features that "
                                       f"{train / 'item_feat_dict.json'} describes; they keep the training features\n")
    (ev / "item_feat_dict.json").unlink()
    assert V.pick_item_features(str(ev), str(train)) == {"1": {"100": 5}, "2": {"100": 6}, "3": {"100": 7}}


def test_infer_never_reads_the_harness_command_line(trained, data, tmp_path, monkeypatch):
    import infer
    for k, v in env_for(data, tmp_path, MODEL_OUTPUT_PATH=str(trained[1])).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["harness.py", "-h", "--top_k", "100", "--top", "100"])
    top, users = infer.infer(argv=["--num_workers", "0"])
    assert len(users) == 10 and all(len(t) == 10 for t in top)


def test_a_stop_that_hangs_in_unwinding_still_ends_the_process():
    """With a stop deadline (infer.py's), a SIGTERM whose unwinding never ends (a finally that
    blocks, as a deadlocked DataLoader shutdown would) still ends the process: one line, 143."""
    code = ("import os, sys, time; sys.path.insert(0, os.getcwd()); import layout\n"
            "def main():\n"
            "    try:\n"
            "        print('ready', flush=True); time.sleep(3600)\n"
            "    finally:\n"
            "        time.sleep(3600)\n"
            "layout.run_cli(main, stop_grace_s=1)\n")
    p = subprocess.Popen([PY, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    assert p.returncode == 143 and err == "stopped by SIGTERM (forced after 1 s of unwinding)\n", err
