"""Bad input through the real command lines: exit code 2, one line on stderr, no traceback, and
exactly the message we promise (file, line or byte offset, field, what was expected).

A small valid demo folder is generated once; each case copies it, breaks one thing and runs one
script. The subprocess cases run in parallel threads (the cost is mostly `import torch`); the
`lib` cases run the same entry point in this process, to keep the file fast.
"""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset as D  # noqa: E402
import layout as L  # noqa: E402

PY = sys.executable
TRAIN = ["main.py", "--num_epochs", "1", "--num_workers", "0", "--hidden_units", "16", "--feat_dim", "8",
         "--num_blocks", "1", "--maxlen", "10", "--batch_size", "16", "--num_neg", "8"]
LAYOUT = "[user_id, item_id, user_feat, item_feat, action_type, timestamp]"


# ---------------------------------------------------------------------------------------------
# Corruption helpers: every one keeps the rest of the folder valid
# ---------------------------------------------------------------------------------------------

def offsets_of(path):
    out, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            out.append(pos)
            pos += len(line)
    return out


def set_line(seq, lineno, text):
    """Replace line `lineno` (1-based) of a JSON-lines file and rewrite its offsets pickle."""
    lines = Path(seq).read_text().split("\n")
    lines[lineno - 1] = text
    Path(seq).write_text("\n".join(lines))
    pkl = Path(str(seq)[:-len(".jsonl")] + "_offsets.pkl")
    if pkl.exists():
        pkl.write_bytes(pickle.dumps(offsets_of(seq)))


def set_offsets(pkl, fn):
    off = pickle.loads(Path(pkl).read_bytes())
    Path(pkl).write_bytes(pickle.dumps(fn(off)))
    return off


def edit_jsonl(path, lineno, fn):
    lines = Path(path).read_text().split("\n")
    obj = json.loads(lines[lineno - 1])
    fn(obj)
    lines[lineno - 1] = json.dumps(obj)
    Path(path).write_text("\n".join(lines))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ---------------------------------------------------------------------------------------------
# The corpus: (id, script, how: "cli" | "lib", corrupt(t, e, ck) -> substitutions, expected)
# {train}, {eval}, {ckpt} stand for the case's folders; other names come from corrupt().
# ---------------------------------------------------------------------------------------------

def _past_end(t, e, ck):
    size = (t / "seq.jsonl").stat().st_size
    set_offsets(t / "seq_offsets.pkl", lambda o: o[:-1] + [size + 10])
    return {"size": size, "off": size + 10}


def _mid_line(t, e, ck):
    off = set_offsets(t / "seq_offsets.pkl", lambda o: o[:2] + [o[2] + 3] + o[3:])
    return {"off": off[2] + 3}


def _fewer(t, e, ck):
    off = set_offsets(t / "seq_offsets.pkl", lambda o: o[:-1])
    return {"end": off[-1], "size": (t / "seq.jsonl").stat().st_size}


def _more(t, e, ck):
    off = set_offsets(t / "seq_offsets.pkl", lambda o: o + [o[-1]])
    return {"off": off[-1]}


def _mm(fn, part="part-00000", lineno=1):
    def corrupt(t, e, ck):
        edit_jsonl(t / "creative_emb/emb_82_64" / part, lineno, fn)
    return corrupt


def _emb_short(o):
    o["emb"] = o["emb"][:-1]


def _emb_nan(o):
    o["emb"][5] = float("nan")


def _emb_text(o):
    o["emb"] = "abc"


def _ckpt_file(ck):
    return next(ck.glob("global_step*/model.pt"))


def _ckpt_other_width(t, e, ck):
    f = _ckpt_file(ck)
    state = torch.load(f, weights_only=True)
    state["model"] = {k: torch.cat([v, v]) if v.dim() else v for k, v in state["model"].items()}
    torch.save(state, f)
    return {"file": f}


def _no_ckpt(t, e, ck):
    shutil.rmtree(ck)
    ck.mkdir()


def _bad_record(line):
    return lambda t, e, ck: set_line(t / "seq.jsonl", 4, line)


def _bad_predict(line):
    return lambda t, e, ck: set_line(e / "predict_seq.jsonl", 3, line)


def _write(rel, data):
    def corrupt(t, e, ck):
        p = {"t": t, "e": e}[rel[0]] / rel[2:]
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return corrupt


def _remove(rel):
    return lambda t, e, ck: ({"t": t, "e": e}[rel[0]] / rel[2:]).unlink()


def _empty_seq(t, e, ck):
    (t / "seq.jsonl").write_bytes(b"")
    (t / "seq_offsets.pkl").write_bytes(pickle.dumps([]))


def _set_edit(lineno, fn):
    return lambda t, e, ck: edit_jsonl(e / "predict_set.jsonl", lineno, fn)


def _dup_rid(o):
    o["retrieval_id"] = 0


def _cid_text(o):
    o["creative_id"] = "abc"


def _feats_list(o):
    o["features"] = [1, 2]


def _predict_past_end(t, e, ck):
    size = (e / "predict_seq.jsonl").stat().st_size
    set_offsets(e / "predict_seq_offsets.pkl", lambda o: o[:-1] + [size])
    return {"size": size}


def _unknown_item(t, e, ck):
    set_line(t / "seq.jsonl", 5, '[[5, 3, null, null, 0, 1746000000], [5, 9999, null, null, 1, 1746000100]]')


R = "{train}/seq.jsonl"
CASES = [
    # --- training sequences (main.py) ---
    ("seq_bad_json", "train", "cli", _bad_record("not json"),
     f"error: {R}:4: invalid JSON (Expecting value, column 1), expected a JSON array of records"),
    ("seq_line_object", "train", "lib", _bad_record('{"user": 5}'),
     f"{R}:4: the line is a JSON object, expected a JSON array of records {LAYOUT}"),
    ("seq_empty_array", "train", "lib", _bad_record("[]"),
     f"{R}:4: empty array, expected at least one record {LAYOUT}"),
    ("record_not_array", "train", "lib", _bad_record('[[5, 3, null, null, 0, 1746000000], "oops"]'),
     f"{R}:4: record 2 of 2 is a JSON string, expected a 6-element array {LAYOUT}"),
    ("record_short", "train", "cli", _bad_record('[[5, 3, null, null, 0, 1746000000], [5, 3, null, null, 0]]'),
     f"error: {R}:4: record 2 of 2 has 5 elements, expected 6 {LAYOUT}"),
    ("user_id_negative", "train", "cli", _bad_record("[[-5, 3, null, null, 0, 1746000000]]"),
     f"error: {R}:4: record 1 of 1: user_id is -5, expected a non-negative int (re-id) or a non-empty string (raw id)"),
    ("user_id_float", "train", "lib", _bad_record("[[5.5, 3, null, null, 0, 1746000000]]"),
     f"{R}:4: record 1 of 1: user_id is 5.5, expected a non-negative int (re-id) or a non-empty string (raw id)"),
    ("item_id_string", "train", "lib", _bad_record('[[5, "abc", null, null, 0, 1746000000]]'),
     f'{R}:4: record 1 of 1: item_id is "abc", expected a non-negative int or null (profile record)'),
    ("item_id_negative", "train", "lib", _bad_record("[[5, -3, null, null, 0, 1746000000]]"),
     f"{R}:4: record 1 of 1: item_id is -3, expected a non-negative int or null (profile record)"),
    ("timestamp_string", "train", "lib", _bad_record('[[5, 3, null, null, 0, "2025-05-01"]]'),
     f'{R}:4: record 1 of 1: timestamp is "2025-05-01", expected a non-negative int (Unix seconds)'),
    ("timestamp_negative", "train", "lib", _bad_record("[[5, 3, null, null, 0, -1]]"),
     f"{R}:4: record 1 of 1: timestamp is -1, expected a non-negative int (Unix seconds)"),
    ("action_unknown", "train", "cli", _bad_record("[[5, 3, null, null, 7, 1746000000]]"),
     f"error: {R}:4: record 1 of 1: action_type is 7, expected 0, 1, 2 or null"),
    ("item_feat_value_object", "train", "cli", _bad_record('[[5, 3, null, {"112": {"a": 1}}, 0, 1746000000]]'),
     f'error: {R}:4: record 1 of 1: item_feat feature "112" is {{"a": 1}}, expected an int, a string or a list of them'),
    ("user_feat_array", "train", "lib",
     _bad_record("[[5, 3, null, null, 0, 1746000000], [5, null, [103, 1], null, null, 1746000001]]"),
     f"{R}:4: record 2 of 2: user_feat is a JSON array, expected an object {{feature_id: value}} or null"),
    ("item_unknown_to_indexer", "train", "lib", _unknown_item,
     f"{R}:5: item id 9999 unknown to the indexer (num_items 68)", ["--num_workers", "1"]),
    # --- offsets ---
    ("offset_past_end", "train", "cli", _past_end,
     "error: {train}/seq_offsets.pkl: entry 59 (byte offset {off}) is past the end of " + R
     + " ({size} bytes); is the offsets file from this seq file?"),
    ("offset_mid_line", "train", "cli", _mid_line,
     f"error: {R}:3: byte offset {{off}} is not at a line start (the byte before it is not a newline); "
     "is the offsets file from this seq file?"),
    ("offsets_fewer_than_lines", "train", "cli", _fewer,
     "error: {train}/seq_offsets.pkl: 59 offsets, but " + R + " has more lines (the line at the last offset "
     "ends at byte {end} of {size}); expected one offset per line"),
    ("offsets_more_than_lines", "train", "lib", _more,
     "{train}/seq_offsets.pkl: entry 60 (byte offset {off}) is not after entry 59 ({off}), expected increasing "
     "offsets, one per line"),
    ("offsets_not_a_list", "train", "lib", _write("t/seq_offsets.pkl", pickle.dumps("0 10 20")),
     "{train}/seq_offsets.pkl: a pickled str, expected a list of byte offsets (one per line of the seq "
     "file) or a dict re-id -> offset"),
    ("offsets_negative", "train", "lib", _write("t/seq_offsets.pkl", pickle.dumps([0, -7])),
     "{train}/seq_offsets.pkl: entry 1 is -7, expected a non-negative int byte offset"),
    ("offsets_unsafe_pickle", "train", "cli", _write("t/seq_offsets.pkl", pickle.dumps(Evil())),
     "error: {train}/seq_offsets.pkl: unsafe or invalid pickle (refused to load posix.system); only builtin "
     "containers, numbers and numpy arrays are allowed"),
    ("offsets_empty_file", "train", "lib", _write("t/seq_offsets.pkl", b""),
     "{train}/seq_offsets.pkl: empty file, expected a pickle"),
    ("seq_empty", "train", "cli", _empty_seq,
     f"error: {R}: empty file, expected one JSON array of records per line"),
    # --- missing or malformed side files ---
    ("seq_missing", "train", "cli", _remove("t/seq.jsonl"), f"error: {R}: file not found"),
    ("indexer_missing", "train", "lib", _remove("t/indexer.pkl"), "{train}/indexer.pkl: file not found"),
    ("item_feat_dict_bad_json", "train", "lib", _write("t/item_feat_dict.json", '{"1": {"112": 1},}'),
     "{train}/item_feat_dict.json: invalid JSON (Expecting property name enclosed in double quotes: "
     "line 1 column 18 (char 17))"),
    ("item_feat_dict_array", "train", "cli", _write("t/item_feat_dict.json", "[1, 2]"),
     "error: {train}/item_feat_dict.json: a JSON array, expected an object {item re-id: {feature_id: value}}"),
    ("item_feat_dict_key", "train", "lib", _write("t/item_feat_dict.json", '{"item_1": {"112": 1}}'),
     '{train}/item_feat_dict.json: key "item_1" is not an item re-id, expected a decimal integer string like "47086"'),
    # --- multimodal vectors ---
    ("mm_length_differs", "train", "cli", _mm(_emb_short, "part-00001", 2),
     "error: {train}/creative_emb/emb_82_64/part-00001:2: feature 82 vector has 63 values, expected 64 like the "
     "first one ({train}/creative_emb/emb_82_64/part-00000:1)", ["--mm_emb_id", "82"]),
    ("mm_nan", "train", "lib", _mm(_emb_nan, "part-00000", 3),
     "{train}/creative_emb/emb_82_64/part-00000:3: feature 82 vector holds nan at index 5, expected "
     "finite numbers", ["--mm_emb_id", "82"]),
    ("mm_not_numbers", "train", "lib", _mm(_emb_text, "part-00002", 1),
     '{train}/creative_emb/emb_82_64/part-00002:1: emb is "abc", expected a non-empty list of numbers',
     ["--mm_emb_id", "82"]),
    ("mm_feature_absent", "train", "cli", lambda t, e, ck: None,
     "error: {train}/creative_emb: no vectors for multimodal feature 83 (looked for emb_83_*.pkl and "
     "emb_83_*/part-*)", ["--mm_emb_id", "83"]),
    ("mm_pickle_not_dict", "train", "lib", _write("t/creative_emb/emb_81_32.pkl", pickle.dumps([1.0, 2.0])),
     "{train}/creative_emb/emb_81_32.pkl: a pickled list, expected a dict creative_id -> vector"),
    # --- inference (infer.py, one shared checkpoint) ---
    ("predict_set_bad_json", "infer", "cli", _write("e/predict_set.jsonl", '{"creative_id": 1}\n{oops\n'),
     "error: {eval}/predict_set.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes, "
     "column 2), expected one JSON value per line"),
    ("predict_set_cid_string", "infer", "lib", _set_edit(3, _cid_text),
     '{eval}/predict_set.jsonl:3: creative_id is "abc", expected a non-negative int'),
    ("predict_set_dup_retrieval_id", "infer", "lib", _set_edit(5, _dup_rid),
     "{eval}/predict_set.jsonl:5: retrieval_id 0 already used on line 1, expected unique retrieval ids"),
    ("predict_set_features_array", "infer", "lib", _set_edit(2, _feats_list),
     "{eval}/predict_set.jsonl:2: features is a JSON array, expected an object {feature_id: value} or null"),
    ("predict_set_missing", "infer", "cli", _remove("e/predict_set.jsonl"),
     "error: {eval}/predict_set.jsonl: file not found (looked for the candidate pool in {eval})"),
    ("predict_seq_missing", "infer", "lib", _remove("e/predict_seq.jsonl"),
     "{eval}/predict_seq.jsonl: file not found (looked for the predict sequences in {eval})"),
    ("predict_seq_bad_action", "infer", "cli", _bad_predict('[["user_x", 20000000001, null, {"112": "new"}, 5, 1]]'),
     "error: {eval}/predict_seq.jsonl:3: record 1 of 1: action_type is 5, expected 0, 1, 2 or null",
     ["--num_workers", "0"]),
    ("predict_seq_bad_action_in_worker", "infer", "lib", _bad_predict("[[7, 3, null, null, 5, 1]]"),
     "{eval}/predict_seq.jsonl:3: record 1 of 1: action_type is 5, expected 0, 1, 2 or null",
     ["--num_workers", "1"]),
    ("predict_offsets_past_end", "infer", "cli", _predict_past_end,
     "error: {eval}/predict_seq_offsets.pkl: entry 9 (byte offset {size}) is past the end of "
     "{eval}/predict_seq.jsonl ({size} bytes); is the offsets file from this seq file?"),
    ("item_feat_dict_array_at_inference", "infer", "lib", _write("t/item_feat_dict.json", "[1, 2]"),
     "{train}/item_feat_dict.json: a JSON array, expected an object {item re-id: {feature_id: value}}",
     []),
    ("checkpoint_other_shapes", "infer", "cli", _ckpt_other_width,
     "error: {file}: weights do not match the model config (size mismatch for item_tower.mm_missing: copying "
     "a param with shape torch.Size([2, 8]) from checkpoint, the shape in current model is torch.Size([1, 8]).)"),
    ("checkpoint_missing", "infer", "cli", _no_ckpt,
     "error: {ckpt}: no checkpoint (looked for model.pt or global_step*/meta.json)"),
    # --- CTR precompute ---
    ("ctr_bad_json", "ctr", "cli", _bad_record("not json"),
     f"{R}:4: invalid JSON (Expecting value: line 1 column 1 (char 0)), expected a JSON array of records"),
]


def _case(c):
    cid, script, how, corrupt, expected, *rest = c
    args = rest[0] if rest else []
    marks = rest[1:] if len(rest) > 1 else []
    return pytest.param(cid, script, how, corrupt, expected, args, id=cid, marks=marks)


# ---------------------------------------------------------------------------------------------
# Fixtures: demo data, one trained checkpoint, every subprocess case run up front in parallel
# ---------------------------------------------------------------------------------------------

def _run(cmd, env):
    return subprocess.run([PY, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _env(d, ck):
    return dict(os.environ, TRAIN_DATA_PATH=str(d / "train"), EVAL_DATA_PATH=str(d / "eval"),
                USER_CACHE_PATH=str(d / "cache"), TRAIN_LOG_PATH=str(d / "log"), TRAIN_TF_EVENTS_PATH=str(d / "tb"),
                TRAIN_CKPT_PATH=str(d / "ckpt_out"), MODEL_OUTPUT_PATH=str(ck), EVAL_RESULT_PATH=str(d / "result"))


def _train_here(argv):
    """main.main in this process; its SIGTERM/SIGINT handlers would otherwise outlive it."""
    import main
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return main.main(argv)
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)


def _prepare(base, root, c):
    """Copy the valid folders for case c, break them; -> (case dir, ckpt dir, substitutions)."""
    cid, script, how, corrupt, expected, args = c
    d = root / cid
    shutil.copytree(base / "data/train", d / "train")
    shutil.copytree(base / "data/eval", d / "eval")
    ck = base / "ckpt"
    if script == "infer":
        ck = d / "ckpt"
        shutil.copytree(base / "ckpt", ck)
    subs = corrupt(d / "train", d / "eval", ck) or {}
    return d, ck, {"train": d / "train", "eval": d / "eval", "ckpt": ck, **subs}


def _cmd(script, d, args):
    if script == "train":
        return [*TRAIN, *args]
    if script == "infer":
        return ["infer.py", *args]
    return ["precompute_ctr.py", "--seq_path", d / "train/seq.jsonl", "--output_dir", d / "ctr_out", *args]


ALL = [_case(c) for c in CASES]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid demo folders, a checkpoint trained on them and the results of every subprocess case.

    The subprocesses run three at a time; the training and CTR cases start before the shared
    checkpoint is trained (in this process: a subprocess would pay the torch import again), the
    inference cases once it exists."""
    import make_demo_data
    b = tmp_path_factory.mktemp("valid")
    root = tmp_path_factory.mktemp("cases")
    assert make_demo_data.main(["--out", str(b / "data"), "--users", "60", "--items", "80", "--eval_users", "10"]) == 0
    cli = [p.values for p in ALL if p.values[2] == "cli"]
    jobs = {}
    with ThreadPoolExecutor(3) as pool:
        def submit(c):
            d, ck, subs = _prepare(b, root, c)
            jobs[c[0]] = (pool.submit(_run, _cmd(c[1], d, c[5]), _env(d, ck)), subs)
        for c in cli:
            if c[1] != "infer":
                submit(c)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in _env(b / "data", b / "ckpt").items():
                mp.setenv(k, v)
            mp.setenv("TRAIN_CKPT_PATH", str(b / "ckpt"))
            _train_here(TRAIN[1:])
        for c in cli:
            if c[1] == "infer":
                submit(c)
    return b, {cid: (job.result(), subs) for cid, (job, subs) in jobs.items()}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def _fill(template, subs):
    """Put the case's paths (and other variable parts) into {name} slots; other braces stay."""
    return re.sub(r"\{(\w+)\}", lambda m: str(subs.get(m.group(1), m.group(0))), template)


@pytest.mark.parametrize("cid, script, how, corrupt, expected, args", ALL)
def test_bad_input(cid, script, how, corrupt, expected, args, world, tmp_path, monkeypatch):
    base, cli_results = world
    if how == "cli":
        p, subs = cli_results[cid]
        want = _fill(expected, subs)
        assert "Traceback" not in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.endswith("\n"), p.stderr
        assert p.stderr.rstrip("\n") == want
        assert p.returncode == 2
        return
    # in process: the same entry point the script's main() calls, with the same environment
    d, ck, subs = _prepare(base, tmp_path, (cid, script, how, corrupt, expected, args))
    for k, v in _env(d, ck).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(L.DataError) as e:
        if script == "train":
            _train_here([*TRAIN[1:], *args])
        else:
            import infer
            monkeypatch.setattr(sys, "argv", ["infer.py", "--num_workers", "0", *args])
            infer.infer()
    assert str(e.value) == _fill(expected, subs)


def test_corpus_size():
    """The issue asks for at least 20 malformed inputs through the real command lines."""
    assert sum(1 for c in CASES if c[2] == "cli" and len(c) < 7) >= 20


def test_strict_items_only_in_training(world, tmp_path):
    """Training refuses an item id past num_items; inference maps it (a raw creative id) to the
    cold-item row or 0."""
    cfg, table, builder, _, _ = D.load_train_data(world[0] / "data/train", D.DataConfig(maxlen=10, mm_emb_id=[]),
                                                  tmp_path)
    n = cfg.num_items
    assert builder.strict_items and builder.item_rows([1, n]).tolist() == [1, n]
    for bad in (n + 1, 0, "7"):
        with pytest.raises(L.DataError) as e:
            builder.item_rows([1, bad])
        assert str(e.value) == f"item id {json.dumps(bad)} unknown to the indexer (num_items {n})"
    loose = D.SequenceBuilder(cfg, table, {})
    cid = next(iter(table.row_of_cid))
    assert loose.item_rows([n + 12345, cid, "7"]).tolist() == [0, table.row_of_cid[cid], 0]
