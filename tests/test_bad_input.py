"""Bad input through the real command lines: exit code 2, one line on stderr, no traceback, and
exactly the message we promise (file, line or byte offset, field, what was expected).

A small valid demo folder is generated once; each case copies it, breaks one thing and runs one
script. The subprocess cases run in parallel threads (the cost is mostly `import torch`); the
`lib` cases run the same entry point in this process, to keep the file fast.
"""
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
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


def _dup_item_feats(t, e, ck):
    """item_feat_dict.json, valid but for item "3" given again at the end (JSON keeps the last)."""
    text = (t / "item_feat_dict.json").read_text().rstrip()
    assert text.endswith("}") and '"3": ' in text
    (t / "item_feat_dict.json").write_text(text[:-1] + ', "3": {"100": 9}}')


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
    ("item_feat_dict_duplicate_item", "train", "cli", _dup_item_feats,
     'error: {train}/item_feat_dict.json: key "3" appears twice in one object, expected each key once'),
    ("item_feat_dict_duplicate_feature", "train", "lib", _write("t/item_feat_dict.json", '{"1": {"112": 1, "112": 2}}'),
     '{train}/item_feat_dict.json: key "112" appears twice in one object, expected each key once'),
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
     '{eval}/predict_set.jsonl:3: creative_id is "abc", expected a non-negative int below 2^63'),
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
     "error: {file}: weights do not match the model config (size mismatch for item_trained: copying "
     "a param with shape torch.Size([138]) from checkpoint, the shape in current model is torch.Size([69]).)"),
    ("checkpoint_missing", "infer", "cli", _no_ckpt,
     "error: {ckpt}: no checkpoint (looked for model.pt or global_step*/meta.json)"),
    # --- CTR precompute ---
    ("ctr_bad_json", "ctr", "cli", _bad_record("not json"),
     f"error: {R}:4: invalid JSON (Expecting value: line 1 column 1 (char 0)), expected a JSON array of records"),
]


def _case(c):
    cid, script, how, corrupt, expected, *rest = c
    args = rest[0] if rest else []
    marks = rest[1:] if len(rest) > 1 else []
    return pytest.param(cid, script, how, corrupt, expected, args, id=cid, marks=marks)


# ---------------------------------------------------------------------------------------------
# The wider corpus: every entry point, one subprocess each (run up front, in parallel threads).
# A case's setup(d, base) writes its inputs under d (d/in: inputs, d/out: earlier outputs that an
# error must not clobber) and returns the command's args, plus optional env, substitutions for
# the expected text, fsize (a file-size limit: writes fail with EFBIG, as on a full disk) and
# skip (why the case cannot run here). `expected` is the whole stderr; `code` the exit status.
# After the run: no traceback, the culprit named, no temporary file left behind, and every file
# that existed before is unchanged (on success, those under d/in).
# ---------------------------------------------------------------------------------------------

class Run(NamedTuple):
    cid: str
    script: str
    setup: Callable
    expected: str               # None: only the generic checks (one line, "error: ", the culprit named)
    code: int = 2
    check: Callable = None      # check(d, proc, subs): more assertions
    marks: tuple = ()


SCRIPTS = {"evaluate": ["evaluate.py"], "convert": ["convert_public.py"], "ctr": ["precompute_ctr.py"],
           "demo": ["make_demo_data.py"], "retrieval": ["retrieval_torch.py"], "infer": ["infer.py"],
           "train": TRAIN}
NEEDS_CKPT = {"infer"}


def put(path, data):
    """Write text or bytes at path, making its folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    return path


def _unreadable(path):
    """chmod 000; None when that stops reads here, else why the case must be skipped (root)."""
    os.chmod(path, 0)
    try:
        open(path, "rb").close()
    except OSError:
        return None
    os.chmod(path, 0o644)
    return "reads are not stopped by chmod 000 here (running as root)"


def _last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- evaluate.py ---

GT = [{"user_id": "u1", "creative_id": 11}, {"user_id": "u2", "creative_id": 12}, {"user_id": 3, "creative_id": "13"}]
RES = {"time": 0.1, "top10s": [[11, 5], [7, "12"], [13]], "user": ["u1", "u2", "3"]}
NDCG3 = (1 + 1 / math.log2(3) + 1) / 3          # u1 at rank 1, u2 at rank 2, user 3 at rank 1


def _ev(result=None, gt=None, args=(), edit=None):
    """Setup of an evaluate.py case: d/in/result.json and d/in/gt.jsonl (valid unless given)."""
    def setup(d, base):
        res = json.loads(json.dumps(RES)) if result is None else result
        if edit:
            edit(res)
        put(d / "in/result.json", res if isinstance(res, (str, bytes)) else json.dumps(res))
        g = GT if gt is None else gt
        put(d / "in/gt.jsonl", g if isinstance(g, (str, bytes)) else "".join(json.dumps(x) + "\n" for x in g))
        return {"args": ["--result", d / "in/result.json", "--ground_truth", d / "in/gt.jsonl", *args]}
    return setup


def _set(path, value):
    """edit(res): res[path[0]][path[1]]... = value."""
    def edit(res):
        o = res
        for k in path[:-1]:
            o = o[k]
        o[path[-1]] = value
    return edit


def _gt_line(n, **kw):
    return [dict(x, **kw) if i == n else x for i, x in enumerate(GT)]


def _score(nd, hr=1.0):
    def check(d, p, subs):
        m = _last_json(p)
        assert m["HR@10"] == pytest.approx(hr) and m["NDCG@10"] == pytest.approx(nd)
    return check


RF, GF = "{d}/in/result.json", "{d}/in/gt.jsonl"
CID = "expected a creative id (a non-negative int or a digit string)"
UID = "expected a user id (a string or an int)"
RUNS = [
    Run("eval_cid_float", "evaluate", _ev(edit=_set(["top10s", 1, 1], 12.0)),
        f"error: {RF}: top10s[1][1] is 12.0, {CID}"),
    Run("eval_top10s_nested", "evaluate", _ev(edit=lambda r: r.update(top10s=[[t] for t in r["top10s"]])),
        f'error: {RF}: top10s[0][0] is [11, 5], {CID}'),
    Run("eval_cid_bool", "evaluate", _ev(edit=_set(["top10s", 2, 0], True)), f"error: {RF}: top10s[2][0] is true, {CID}"),
    Run("eval_cid_null", "evaluate", _ev(edit=_set(["top10s", 0, 1], None)), f"error: {RF}: top10s[0][1] is null, {CID}"),
    Run("eval_cid_word", "evaluate", _ev(edit=_set(["top10s", 0, 0], "11a")), f'error: {RF}: top10s[0][0] is "11a", {CID}'),
    Run("eval_user_float", "evaluate", _ev(edit=_set(["user", 2], 3.0)), f"error: {RF}: user[2] is 3.0, {UID}"),
    Run("eval_user_bool", "evaluate", _ev(edit=_set(["user", 0], False)), f"error: {RF}: user[0] is false, {UID}"),
    Run("eval_user_null", "evaluate", _ev(edit=_set(["user", 1], None)), f"error: {RF}: user[1] is null, {UID}"),
    Run("eval_user_list", "evaluate", _ev(edit=_set(["user", 1], ["u2"])), f'error: {RF}: user[1] is ["u2"], {UID}'),
    Run("eval_no_user_matches", "evaluate", _ev(edit=_set(["user"], ["x1", "x2", "x3"])),
        f"error: {RF}: none of its 3 users is among the 3 users of {GF}; expected the same users (raw ids, "
        "as in predict_seq.jsonl)"),
    Run("eval_some_users_match", "evaluate", _ev(edit=_set(["user", 1], "x2")),
        f"warning: {RF}: answers 2 of the 3 users of {GF}; the other 1 count as misses", 0,
        _score(2 / 3, 2 / 3)),
    Run("eval_repeated_user", "evaluate",
        _ev(edit=lambda r: r.update(top10s=r["top10s"] + [[12]], user=r["user"] + ["u2"])),
        f"warning: {RF}: 1 repeated users; each one's first top list is scored", 0, _score(NDCG3)),
    Run("eval_all_lists_empty", "evaluate", _ev(edit=_set(["top10s"], [[], [], []])),
        f"warning: {RF}: 3 of 3 top lists are empty", 0, _score(0.0, 0.0)),
    Run("eval_digit_strings_match_ints", "evaluate",
        _ev(edit=lambda r: r.update(top10s=[["11", 5], ["7", 12], ["13"]], user=["u1", "u2", 3])),
        "", 0, _score(NDCG3)),
    Run("eval_gt_empty", "evaluate", _ev(gt="\n\n"),
        f'error: {GF}: no lines, expected one {{"user_id", "creative_id"}} object per line'),
    Run("eval_gt_null_cid", "evaluate", _ev(gt=_gt_line(1, creative_id=None)),
        f"error: {GF}:2: creative_id is null, {CID}"),
    Run("eval_gt_null_user", "evaluate", _ev(gt=_gt_line(2, user_id=None)), f"error: {GF}:3: user_id is null, {UID}"),
    Run("eval_gt_float_cid", "evaluate", _ev(gt=_gt_line(0, creative_id=11.0)),
        f"error: {GF}:1: creative_id is 11.0, {CID}"),
    Run("eval_gt_user_object", "evaluate", _ev(gt=_gt_line(0, user_id={"id": 1})),
        f'error: {GF}:1: user_id is {{"id": 1}}, {UID}'),
    Run("eval_gt_duplicate_user", "evaluate", _ev(gt=GT + [{"user_id": "u1", "creative_id": 5}]),
        f"error: {GF}:4: user u1 appears twice; one target per user"),
    Run("eval_gt_bad_json", "evaluate", _ev(gt='{"user_id": "u1", "creative_id": 11}\n{"user_id": "u2" "creative_id": 12}\n'),
        f"error: {GF}:2: invalid JSON (Expecting ',' delimiter, column 18), expected one JSON value per line"),
    Run("eval_gt_not_utf8", "evaluate", _ev(gt=b'{"user_id": "u\xff1", "creative_id": 11}\n'),
        f"error: {GF}:1: invalid JSON (not UTF-8: invalid start byte at column 15), expected one JSON value per line"),
    Run("eval_result_array", "evaluate", _ev(result="[[11], [12]]"), f"error: {RF}: expected an object with keys top10s and user"),
    Run("eval_result_empty_file", "evaluate", _ev(result=""),
        f"error: {RF}: invalid JSON (Expecting value: line 1 column 1 (char 0))"),
    Run("eval_result_truncated", "evaluate", _ev(result=json.dumps(RES)[:-9]),
        f"error: {RF}: invalid JSON (Unterminated string starting at: line 1 column 68 (char 67))"),
    Run("eval_result_lengths_differ", "evaluate", _ev(edit=_set(["user"], ["u1", "u2"])),
        f"error: {RF}: 3 top lists but 2 users"),
    Run("eval_result_missing", "evaluate",
        lambda d, b: {**_ev()(d, b), "args": ["--result", d / "in/nope.json", "--ground_truth", d / "in/gt.jsonl"]},
        "error: {d}/in/nope.json: file not found"),
    Run("eval_result_is_folder", "evaluate",
        lambda d, b: {**_ev()(d, b), "args": ["--result", d / "in", "--ground_truth", d / "in/gt.jsonl"]},
        "error: {d}/in: cannot read (Is a directory)"),
    Run("eval_gt_is_folder", "evaluate",
        lambda d, b: {**_ev()(d, b), "args": ["--result", d / "in/result.json", "--ground_truth", d / "in"]},
        "error: {d}/in: a folder, expected the ground_truth.jsonl file"),
    Run("eval_result_duplicate_key", "evaluate",
        _ev(result='{"top10s": [[11], [12], [13]], "user": ["u1", "u2", "3"], "user": ["x", "y", "z"]}'),
        f'error: {RF}: key "user" appears twice in one object, expected each key once'),
    Run("eval_gt_duplicate_key", "evaluate", _ev(gt='{"user_id": "u1", "creative_id": 11, "creative_id": 5}\n'),
        f'error: {GF}:1: key "creative_id" appears twice in one object, expected each key once'),
    Run("eval_baselines_other_users", "evaluate",
        lambda d, b: {"args": [*_ev()(d, b)["args"], "--train_dir", b / "data/train", "--eval_dir", b / "data/eval"],
                      "subs": {"eval": b / "data/eval"}},
        f"warning: {{eval}}/predict_seq.jsonl: 0 of the 3 users of {GF} are among its users; the baselines count "
        "the other 3 as misses", 0, _score(NDCG3)),
    Run("eval_k_zero", "evaluate", _ev(args=["--k", "0"]), "error: --k must be >= 1, got 0"),
    Run("eval_k_not_int", "evaluate", _ev(args=["--k", "ten"]),
        "error: argument --k: invalid int value: 'ten' (see evaluate.py --help)"),
    Run("eval_train_dir_alone", "evaluate", _ev(args=["--train_dir", "x"]),
        "error: --train_dir and --eval_dir go together"),
]


def _chmod_case(make, rel):
    """A setup that makes a valid case, then makes d/<rel> unreadable (skipped where root reads anyway)."""
    def setup(d, base):
        out = make(d, base)
        why = _unreadable(d / rel)
        return {**out, "skip": why} if why else out
    return setup


RUNS += [
    Run("eval_gt_unreadable", "evaluate", _chmod_case(_ev(), "in/gt.jsonl"),
        "error: {d}/in/gt.jsonl: cannot read (Permission denied)"),
]


# --- convert_public.py ---

U_ITEM = "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|" + "|".join("1" if g == i % 19 else "0" for g in range(19))
                 + "\n" for i in (1, 2, 3))
U_DATA = "1\t1\t5\t100\n1\t2\t3\t101\n1\t3\t4\t102\n2\t1\t4\t100\n2\t3\t2\t105\n2\t2\t5\t110\n"


def _ml(data=U_DATA, item=U_ITEM, user="1|24|M|technician|85711\n2|53|F|other|94043\n", args=(), out="out", extra=None):
    """A MovieLens-100K folder d/in (u.data, u.item, u.user), converted into d/<out>."""
    def setup(d, base):
        for name, text in (("u.data", data), ("u.item", item), ("u.user", user)):
            if text is not None:
                put(d / "in" / name, text)
        (d / "in").mkdir(parents=True, exist_ok=True)
        res = {"args": ["--format", "movielens", "--input", d / "in", "--out", d / out, *args]}
        if extra:
            res.update(extra(d) or {})
        return res
    return setup


def _s3(txt="1 1 2 3\n2 1 2 3 4\n", attrs=None, args=()):
    def setup(d, base):
        put(d / "in/A.txt", txt)
        if attrs is not None:
            put(d / "in/A_item2attributes.json", attrs)
        return {"args": ["--format", "s3rec", "--input", d / "in/A.txt", "--out", d / "out", *args]}
    return setup


def _data_line(n, text):
    lines = U_DATA.splitlines(keepends=True)
    lines[n - 1] = text
    return "".join(lines)


def _meta_events(d, n):
    assert json.loads((d / "out/dataset_meta.json").read_text())["counts"]["events"] == n


def _no_partial_output(d, p, subs):
    """A conversion that failed while writing: no temporary file, and dataset_meta.json says the
    folder is incomplete."""
    meta = json.loads((d / "out/dataset_meta.json").read_text())
    assert meta["incomplete"] is True


INT63 = "is out of range, expected a non-negative integer below 2^63"
UD = "{d}/in/u.data"
RUNS += [
    Run("conv_item_id_over_int64", "convert", _ml(_data_line(2, "1\t99999999999999999999\t3\t101\n")),
        f"error: {UD}:2: item id '99999999999999999999' {INT63}"),
    Run("conv_item_id_2pow63", "convert", _ml(_data_line(2, f"1\t{2**63}\t3\t101\n")),
        f"error: {UD}:2: item id '{2**63}' {INT63}"),
    Run("conv_item_id_negative", "convert", _ml(_data_line(3, "1\t-3\t4\t102\n")), f"error: {UD}:3: item id '-3' {INT63}"),
    Run("conv_user_id_negative", "convert", _ml(_data_line(4, "-2\t1\t4\t100\n")), f"error: {UD}:4: user id '-2' {INT63}"),
    Run("conv_timestamp_over_int64", "convert", _ml(_data_line(5, f"2\t3\t2\t{2**64}\n")),
        f"error: {UD}:5: timestamp '{2**64}' {INT63}"),
    Run("conv_timestamp_negative", "convert", _ml(_data_line(1, "1\t1\t5\t-100\n")),
        f"error: {UD}:1: timestamp '-100' {INT63}"),
    Run("conv_rating_nan", "convert", _ml(_data_line(2, "1\t2\tnan\t101\n"), args=["--min_rating", "3"]),
        f"error: {UD}:2: rating 'nan' is not a finite number"),
    Run("conv_rating_inf", "convert", _ml(_data_line(6, "2\t2\t-inf\t110\n")),
        f"error: {UD}:6: rating '-inf' is not a finite number"),
    Run("conv_item_id_arabic_digits", "convert", _ml(_data_line(3, "1\t\u0663\t4\t102\n")),
        f"error: {UD}:3: item id '\u0663' is not an integer"),
    Run("conv_item_id_underscore", "convert", _ml(_data_line(3, "1\t1_0\t4\t102\n")),
        f"error: {UD}:3: item id '1_0' is not an integer"),
    Run("conv_u_data_empty", "convert", _ml(""),
        f"error: {UD}: empty file, expected tab-separated lines user, item, rating, timestamp"),
    Run("conv_u_data_truncated", "convert", _ml(U_DATA[:-5]),
        f"error: {UD}:6: expected 4 '\\t'-separated fields (user, item, rating, timestamp), got 3"),
    Run("conv_u_data_cut_in_a_number", "convert", _ml(U_DATA[:-2]),
        f"warning: {UD}:6: the file ends without a newline; if it was cut short, this last line is incomplete",
        0, lambda d, p, s: _meta_events(d, 6)),
    Run("conv_u_data_binary", "convert", _ml(b"\x00\x01\x02\xff\n"),
        f"error: {UD}:1: expected 4 '\\t'-separated fields (user, item, rating, timestamp), got 1"),
    Run("conv_u_item_duplicate", "convert", _ml(item=U_ITEM + U_ITEM.splitlines(keepends=True)[1]),
        "error: {d}/in/u.item:4: item 2 already defined on an earlier line, expected one line per item"),
    Run("conv_u_user_duplicate", "convert", _ml(user="1|24|M|technician|85711\n1|53|F|other|94043\n"),
        "error: {d}/in/u.user:2: user 1 already defined on an earlier line, expected one line per user"),
    Run("conv_u_user_age_text", "convert", _ml(user="1|24|M|technician|85711\n2|old|F|other|94043\n"),
        "error: {d}/in/u.user:2: age 'old' is not an integer"),
    Run("conv_u_item_missing", "convert", _ml(item=None),
        "error: {d}/in/u.item: missing; the 100K variant needs u.item next to u.data"),
    Run("conv_u_item_is_folder", "convert",
        _ml(item=None, extra=lambda d: (d / "in/u.item").mkdir() and None),
        "error: {d}/in/u.item: a folder, expected a file; the 100K variant needs u.item next to u.data"),
    Run("conv_ratings_csv_header_only", "convert",
        lambda d, b: {"args": ["--format", "movielens", "--input", put(d / "in/ratings.csv",
                                                                       "userId,movieId,rating,timestamp\n").parent,
                               "--out", d / "out"]},
        "error: {d}/in/ratings.csv: only a header line, expected rating lines after it"),
    Run("conv_movies_csv_cut_in_a_quote", "convert",
        lambda d, b: {"args": ["--format", "movielens", "--out", d / "out", "--input",
                               put(d / "in/movies.csv", 'movieId,title,genres\n1,"Heat (1995),Drama\n') and
                               put(d / "in/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4,5\n1,1,4,6\n1,1,4,7\n").parent]},
        "error: {d}/in/movies.csv:2: not valid CSV (unexpected end of data); is the file cut short?"),
    Run("conv_ratings_dat_fields", "convert",
        lambda d, b: {"args": ["--format", "movielens", "--out", d / "out", "--input",
                               put(d / "in/ratings.dat", "1::1::5::10\n1::2::5\n").parent]},
        "error: {d}/in/ratings.dat:2: expected 4 '::'-separated fields (UserID::MovieID::Rating::Timestamp), got 3"),
    Run("conv_min_rating_nan", "convert", _ml(args=["--min_rating", "nan"]), "error: --min_rating nan: expected a finite number"),
    Run("conv_min_seq_len_2", "convert", _ml(args=["--min_seq_len", "2"]),
        "error: --min_seq_len 2: must be at least 3 (train, valid and test each need an event)"),
    Run("conv_input_flag_missing", "convert", lambda d, b: {"args": ["--format", "movielens", "--out", d / "out"]},
        "error: the following arguments are required: --input (see convert_public.py --help)"),
    Run("conv_input_missing", "convert",
        lambda d, b: {"args": ["--format", "movielens", "--input", d / "in", "--out", d / "out"]},
        "error: {d}/in: not a folder; --format movielens takes the dataset folder"),
    Run("conv_out_is_a_file", "convert", _ml(out="out/f", extra=lambda d: put(d / "out/f", "keep me") and None),
        "error: {d}/out/f: not a folder (--out), expected a folder to write into"),
    Run("conv_out_under_a_file", "convert", _ml(out="out/f/sub", extra=lambda d: put(d / "out/f", "keep me") and None),
        "error: {d}/out/f/sub: cannot write there (--out: Not a directory)"),
    Run("conv_out_holds_foreign_data", "convert",
        _ml(extra=lambda d: put(d / "out/train/seq.jsonl", "[[1, 2, null, null, 1, 5]]\n") and None),
        "error: {d}/out/train/seq.jsonl: exists and was not written by convert_public.py (no dataset_meta.json of "
        "ours in {d}/out); refusing to overwrite it, choose another --out"),
    Run("conv_full_disk", "convert", lambda d, b: {**_ml()(d, b), "fsize": 200},
        "error: {d}/out/train/indexer.pkl: File too large", check=_no_partial_output),
    Run("conv_u_data_unreadable", "convert", _chmod_case(_ml(), "in/u.data"),
        "error: {d}/in/u.data: cannot read (Permission denied)"),
    # S3Rec
    Run("conv_s3_item_over_int64", "convert", _s3("1 1 2 3\n2 1 2 18446744073709551616\n"),
        f"error: {{d}}/in/A.txt:2: item id '18446744073709551616' {INT63}"),
    Run("conv_s3_item_negative", "convert", _s3("1 1 -2 3\n"), f"error: {{d}}/in/A.txt:1: item id '-2' {INT63}"),
    Run("conv_s3_user_twice", "convert", _s3("1 1 2 3\n2 1 2\n1 4 5 6\n"),
        "error: {d}/in/A.txt:3: user 1 already has a line ({d}/in/A.txt:1); expected one line per user"),
    Run("conv_s3_empty", "convert", _s3(""), "error: {d}/in/A.txt: empty file, expected lines `user item1 item2 ...`"),
    Run("conv_s3_attrs_duplicate_key", "convert", _s3(attrs='{"1": [1, 2], "2": [3], "1": [4]}'),
        'error: {d}/in/A_item2attributes.json: key "1" appears twice in one object, expected each item once'),
    Run("conv_s3_attrs_not_utf8", "convert", _s3(attrs=b'{"1": [1], "\xff": [2]}'),
        "error: {d}/in/A_item2attributes.json: not UTF-8 text (invalid start byte at byte 12)"),
    Run("conv_s3_attrs_truncated", "convert", _s3(attrs='{"1": [1, 2],\n "2": [3'),
        "error: {d}/in/A_item2attributes.json:2: not valid JSON (Expecting ',' delimiter)"),
    Run("conv_s3_attrs_folder", "convert", lambda d, b: {**_s3()(d, b), "_": (d / "in/A_item2attributes.json").mkdir()},
        "error: {d}/in/A_item2attributes.json: a folder, expected the JSON file {item id: [attribute ids]}"),
    Run("conv_s3_attrs_float", "convert", _s3(attrs='{"1": [1.5]}'),
        "error: {d}/in/A_item2attributes.json: item '1': expected a list of integer attribute ids, got [1.5]"),
    Run("conv_s3_min_rating", "convert", _s3(args=["--min_rating", "3"]),
        "error: --min_rating: S3Rec files hold no ratings; drop the flag"),
]


# --- precompute_ctr.py ---

SEQ = ('[[1, 10, null, {}, 1, 5], [1, 11, null, {}, 0, 6], [1, null, {}, null, null, 7]]\n'
       '[[2, 10, null, {}, null, 5], [2, 12, null, {}, 1, 6]]\n')


def _ctr(seq=SEQ, args=None, prior=("--prior", "1,3"), sentinel=True):
    """precompute_ctr.py on d/in/seq.jsonl into d/out, where an earlier run's ctr_meta.json lies."""
    def setup(d, base):
        put(d / "in/seq.jsonl", seq)
        if sentinel:
            put(d / "out/ctr_meta.json", '{"from": "an earlier run"}')
        fill = {"{seq}": str(d / "in/seq.jsonl"), "{out}": str(d / "out")}
        a = (["--seq_path", d / "in/seq.jsonl", "--output_dir", d / "out", *(fill.get(x, x) for x in prior)]
             if args is None else args(d))
        return {"args": a}
    return setup


def _ctr_meta(**want):
    def check(d, p, subs):
        meta = json.loads((d / "out/ctr_meta.json").read_text())
        assert {k: meta[k] for k in want} == want
    return check


SQ = "{d}/in/seq.jsonl"
RUNS += [
    Run("ctr_no_clicks", "ctr", _ctr(SEQ.replace(", 1, ", ", 0, ")),
        f"warning: {SQ}: none of its 4 item events is a click (all exposures or null actions); every CTR is 0 "
        "before smoothing and the features carry no signal", 0, _ctr_meta(num_events=4, num_clicks=0)),
    Run("ctr_all_null_actions", "ctr", _ctr(SEQ.replace(", 1, ", ", null, ").replace(", 0, ", ", null, "), prior=()),
        f"warning: {SQ}: none of its 4 item events is a click (all exposures or null actions); every CTR is 0 "
        "before smoothing and the features carry no signal", 0, _ctr_meta(num_events=4, num_clicks=0)),
    Run("ctr_no_events_fixed_prior", "ctr", _ctr('[[1, null, {}, null, null, 7]]\n'),
        f"warning: {SQ}: no item events; the CTR priors are the --prior as given and every user and item gets the "
        "same value", 0, _ctr_meta(num_events=0)),
    Run("ctr_all_lines_skipped", "ctr", _ctr("not json\n[1, 2]\n", prior=("--prior", "1,3", "--skip_bad_records")),
        f"warning: {SQ}: no item events (1 bad lines and 2 bad records skipped); the CTR priors are the --prior "
        "as given and every user and item gets the same value", 0, _ctr_meta(num_events=0, bad_lines=1)),
    Run("ctr_no_events_auto_prior", "ctr", _ctr("", prior=()),
        f"error: {SQ}: no item events to fit a CTR prior on, expected at least one item record (or use --prior A,B)"),
    Run("ctr_seq_is_folder", "ctr", _ctr(args=lambda d: ["--seq_path", d / "in", "--output_dir", d / "out"]),
        "error: {d}/in: a folder, expected the training seq.jsonl file"),
    Run("ctr_seq_missing", "ctr", _ctr(args=lambda d: ["--seq_path", d / "in/nope.jsonl", "--output_dir", d / "out"]),
        "error: {d}/in/nope.jsonl: file not found, expected the training seq.jsonl"),
    Run("ctr_output_dir_is_file", "ctr", _ctr(args=lambda d: ["--seq_path", d / "in/seq.jsonl", "--output_dir",
                                                           d / "out/ctr_meta.json"]),
        "error: {d}/out/ctr_meta.json: not a folder (--output_dir), expected a folder to write into"),
    Run("ctr_output_dir_under_file", "ctr", _ctr(args=lambda d: ["--seq_path", d / "in/seq.jsonl", "--output_dir",
                                                              d / "out/ctr_meta.json/x"]),
        "error: {d}/out/ctr_meta.json/x: cannot write there (--output_dir: {d}/out/ctr_meta.json is a file)"),
    Run("ctr_item_pop_is_input", "ctr", _ctr(prior=("--item_pop_path", "{seq}")),
        f"error: {SQ}: output path is the input seq.jsonl, expected a different path (inputs are never overwritten)"),
    Run("ctr_item_pop_is_folder", "ctr", _ctr(prior=("--item_pop_path", "{out}")),
        "error: {d}/out: a folder, expected the output file's path (or nothing there)"),
    Run("ctr_head_quantile_text", "ctr", _ctr(prior=("--head_quantile", "most")),
        "error: argument --head_quantile: --head_quantile 'most': expected a number in [0, 1] (see precompute_ctr.py --help)"),
    Run("ctr_k_clip_reversed", "ctr", _ctr(prior=("--k_clip", "50,5")),
        "error: argument --k_clip: --k_clip '50,5': expected LO <= HI (see precompute_ctr.py --help)"),
    Run("ctr_prior_zero", "ctr", _ctr(prior=("--prior", "0,1")),
        "error: argument --prior: --prior '0,1': expected two positive finite numbers (see precompute_ctr.py --help)"),
    Run("ctr_item_id_over_int64", "ctr", _ctr(SEQ + f"[[3, {2**63}, null, {{}}, 1, 5]]\n"),
        f"error: {SQ}:3: record 1 of 1: item_id is {2**63}, expected a non-negative int or null (profile record)"),
    Run("ctr_record_seven_fields", "ctr", _ctr(SEQ + "[[3, 10, null, {}, 1, 5, 9]]\n"),
        f"error: {SQ}:3: record 1 of 1 has 7 elements, expected 6 {LAYOUT}"),
    Run("ctr_user_id_float", "ctr", _ctr("[[1.0, 10, null, {}, 1, 5]]\n"),
        f"error: {SQ}:1: record 1 of 1: user_id is 1.0, expected a non-negative int (re-id) below 2^63"),
    Run("ctr_line_is_object", "ctr", _ctr(SEQ + '{"user": 3}\n'),
        f"error: {SQ}:3: line is a JSON object, expected a JSON array of records"),
    Run("ctr_seq_unreadable", "ctr", _chmod_case(_ctr(), "in/seq.jsonl"),
        "error: {d}/in/seq.jsonl: Permission denied"),
]


# --- make_demo_data.py ---

def _demo(*args, out="out", extra=None):
    def setup(d, base):
        if extra:
            extra(d)
        return {"args": ["--out", d / out, "--users", "20", "--items", "30", "--eval_users", "5", "--sanity_users", "5",
                         *args]}
    return setup


RUNS += [
    Run("demo_seed_negative", "demo", _demo("--seed", "-1"), "error: --seed -1: expected an integer >= 0"),
    Run("demo_days_nan", "demo", _demo("--days", "nan"),
        "error: --days nan: expected a number > 0 and <= 36500 (a century of timestamps)"),
    Run("demo_days_inf", "demo", _demo("--days", "inf"),
        "error: --days inf: expected a number > 0 and <= 36500 (a century of timestamps)"),
    Run("demo_mean_events_negative", "demo", _demo("--mean_events", "-5"), "error: --mean_events -5.0: expected a number > 0"),
    Run("demo_pool_negative", "demo", _demo("--pool", "-3"), "error: --pool -3: expected an integer >= 0"),
    Run("demo_latent_dim_zero", "demo", _demo("--latent_dim", "0"), "error: --latent_dim 0: expected an integer >= 1"),
    Run("demo_max_below_min_events", "demo", _demo("--min_events", "9", "--max_events", "3"),
        "error: --max_events 3: expected an integer >= --min_events (9)"),
    Run("demo_cutoff_one", "demo", _demo("--cutoff", "1"), "error: --cutoff 1.0: expected a number > 0 and < 1"),
    Run("demo_mm_dim_huge", "demo", _demo("--mm_dim", "100000000"), "error: --mm_dim 100000000: expected an integer <= 8192"),
    Run("demo_cands_huge", "demo", _demo("--cands", "10000000"), "error: --cands 10000000: expected an integer <= 10000"),
    Run("demo_users_text", "demo", _demo("--users", "many"),
        "error: argument --users: invalid int value: 'many' (see make_demo_data.py --help)"),
    Run("demo_out_is_file", "demo", _demo(out="out/f", extra=lambda d: put(d / "out/f", "keep me")),
        "error: {d}/out/f: not a folder (--out), expected a folder to write into"),
    Run("demo_out_holds_foreign_data", "demo", _demo(extra=lambda d: put(d / "out/train/seq.jsonl", "real data\n")),
        "error: {d}/out/train/seq.jsonl exists and was not made by make_demo_data.py; refusing to overwrite it "
        "(use --force or another --out)"),
    Run("demo_full_disk", "demo", lambda d, b: {**_demo()(d, b), "fsize": 300},
        "error: {d}/out/train/seq.jsonl: File too large"),
]


# --- retrieval_torch.py ---

def _fbin(path, a, header=None):
    a = np.asarray(a, "<f4")
    put(path, np.asarray(a.shape if header is None else header, "<u4").tobytes() + a.tobytes())


def _u64(path, a, header=None):
    a = np.asarray(a, "<u8")
    a = a.reshape(-1, 1) if a.ndim == 1 else a
    put(path, np.asarray(a.shape if header is None else header, "<u4").tobytes() + a.tobytes())


QV = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
BV = np.eye(6, 3, dtype=np.float32) + np.arange(18, dtype=np.float32).reshape(6, 3) / 100


def _rt(*args, query=QV, base=BV, ids=None, edit=None):
    """retrieval_torch.py on d/in/{q,b}.fbin and d/in/id.u64bin into d/out/top.u64bin, where an earlier
    result lies."""
    def setup(d, base_dir):
        _fbin(d / "in/q.fbin", query)
        _fbin(d / "in/b.fbin", base)
        _u64(d / "in/id.u64bin", np.arange(100, 100 + len(base)) if ids is None else ids)
        put(d / "out/top.u64bin", b"an earlier result")
        if edit:
            edit(d)
        fill = {"{q}": str(d / "in/q.fbin"), "{out}": str(d / "out"), "{in}": str(d / "in")}
        a = ["--query", d / "in/q.fbin", "--base", d / "in/b.fbin", "--ids", d / "in/id.u64bin",
             "--out", d / "out/top.u64bin", "--k", "3"]
        for flag, v in zip(args[::2], args[1::2]):
            for k, path in fill.items():
                v = v.replace(k, path)
            if flag in a:
                a[a.index(flag) + 1] = v
            else:
                a += [flag, v]
        return {"args": a}
    return setup


def _top_ids(rows):
    def check(d, p, subs):
        got = np.fromfile(d / "out/top.u64bin", "<u4", 2).tolist()
        assert got == [len(QV), rows]
    return check


QF = "{d}/in/q.fbin"
RUNS += [
    Run("rt_k_zero", "retrieval", _rt("--k", "0"), "error: --k 0: expected an integer >= 1"),
    Run("rt_threads_negative", "retrieval", _rt("--threads", "-2"), "error: --threads -2: expected an integer >= 0"),
    Run("rt_nprobe_zero", "retrieval", _rt("--nprobe", "0"), "error: --nprobe 0: expected an integer >= 1"),
    Run("rt_ef_search_zero", "retrieval", _rt("--ef_search", "0"), "error: --ef_search 0: expected an integer >= 1"),
    Run("rt_seed_negative", "retrieval", _rt("--seed", "-1"), "error: --seed -1: expected an integer >= 0"),
    Run("rt_device_unknown", "retrieval", _rt("--device", "gpu"), "error: --device gpu: expected cpu or cuda (cuda:N)"),
    Run("rt_nprobe_text", "retrieval", _rt("--nprobe", "all"),
        "error: argument --nprobe: invalid int value: 'all' (see retrieval_torch.py --help)"),
    Run("rt_out_is_folder", "retrieval", _rt("--out", "{out}"),
        "error: {d}/out: a folder (--out), expected the path of the .u64bin file to write"),
    Run("rt_out_is_query", "retrieval", _rt("--out", "{q}"),
        f"error: {QF}: --out would overwrite the input --query {QF}"),
    Run("rt_out_under_file", "retrieval", _rt("--out", "{q}/top.u64bin"),
        f"error: {QF}/top.u64bin: cannot create its folder {QF}: a file is in the way"),
    Run("rt_query_missing", "retrieval", _rt(edit=lambda d: (d / "in/q.fbin").unlink()), f"error: {QF}: file not found"),
    Run("rt_query_is_folder", "retrieval", _rt("--query", "{in}"), "error: {d}/in: a folder, expected a .fbin file"),
    Run("rt_query_short_payload", "retrieval", _rt(edit=lambda d: _fbin(d / "in/q.fbin", QV, (5, 3))),
        f"error: {QF}: header says N=5, D=3, so a .fbin file must be 68 bytes (8 + N*D*4), but it is 56 bytes"),
    Run("rt_query_no_header", "retrieval", _rt(edit=lambda d: put(d / "in/q.fbin", b"\x01\x00")),
        f"error: {QF}: 2 bytes, too short for the 8-byte .fbin header (uint32 N, uint32 D)"),
    Run("rt_query_huge_header", "retrieval", _rt(edit=lambda d: _fbin(d / "in/q.fbin", QV, (2**32 - 1, 3))),
        f"error: {QF}: header says N=4294967295, D=3, so a .fbin file must be 51539607548 bytes (8 + N*D*4), "
        "but it is 56 bytes"),
    Run("rt_query_nan", "retrieval", _rt(query=np.where(QV > 0.5, np.nan, QV)),
        f"error: {QF}: vectors hold NaN or inf (or values near the float32 limit)"),
    Run("rt_dims_differ", "retrieval", _rt(query=QV[:, :2]),
        f"error: {QF}: dim 2 != dim 3 of {{d}}/in/b.fbin"),
    Run("rt_ids_wrong_shape", "retrieval", _rt(ids=np.arange(5)),
        "error: {d}/in/id.u64bin: expected [6, 1] ids (one per row of {d}/in/b.fbin), got [5, 1]"),
    Run("rt_ids_empty_file", "retrieval", _rt(edit=lambda d: put(d / "in/id.u64bin", b"")),
        "error: {d}/in/id.u64bin: 0 bytes, too short for the 8-byte .u64bin header (uint32 N, uint32 D)"),
    Run("rt_base_empty", "retrieval", _rt(base=np.zeros((0, 3)), ids=np.zeros(0)),
        "error: {d}/in/b.fbin: no base vectors to search"),
    Run("rt_query_empty", "retrieval", _rt(query=np.zeros((0, 3))),
        f"warning: {QF}: no query vectors; {{d}}/out/top.u64bin holds no rows", 0,
        lambda d, p, s: np.fromfile(d / "out/top.u64bin", "<u4", 2).tolist() == [0, 3] or pytest.fail("header")),
    Run("rt_k_above_base", "retrieval", _rt("--k", "50"),
        "warning: --k 50 but {d}/in/b.fbin holds only 6 vectors: 6 ids per query", 0, _top_ids(6)),
    Run("rt_full_disk", "retrieval", lambda d, b: {**_rt()(d, b), "fsize": 40},
        "error: {d}/out/top.u64bin: File too large"),
]


# --- infer.py (the shared checkpoint; EVAL_RESULT_PATH holds an earlier result.json) ---

def _inf(*args, edit=None, env=None, fsize=None, cache=False):
    """infer.py on copies of the demo folders and the shared checkpoint; cache: start from the
    training run's caches (the multimodal table), so that nothing but the outputs is written."""
    def setup(d, base):
        shutil.copytree(base / "data/train", d / "train")
        shutil.copytree(base / "data/eval", d / "eval")
        shutil.copytree(base / "ckpt", d / "ckpt")
        if cache:
            shutil.copytree(base / "data/cache", d / "cache")
        put(d / "result/result.json", '{"from": "an earlier run"}')
        subs = (edit(d) if edit else None) or {}
        e = _env(d, d / "ckpt")
        e.update({k: v.format(d=d) for k, v in (env or {}).items()})
        out = {"args": ["--num_workers", "0", *args], "env": e, "subs": subs}
        if fsize:
            out["fsize"] = fsize
        return out
    return setup


def _set_line(rel, n, fn):
    """edit(d): rewrite line n of d/<rel> (a JSON-lines file) by fn(obj), and its offsets pickle if any."""
    def edit(d):
        lines = (d / rel).read_text().splitlines()
        obj = json.loads(lines[n - 1])
        fn(obj)
        lines[n - 1] = json.dumps(obj)
        (d / rel).write_text("\n".join(lines) + "\n")
        pkl = d / (rel[:-len(".jsonl")] + "_offsets.pkl")
        if pkl.exists():
            pkl.write_bytes(pickle.dumps(offsets_of(d / rel)))
    return edit


def _dup_candidates(d):
    lines = (d / "eval/predict_set.jsonl").read_text().splitlines()
    extra = []
    for k, i in enumerate((3, 5, 3)):
        o = json.loads(lines[i])
        o["retrieval_id"] = 1000 + k
        extra.append(json.dumps(o))
    (d / "eval/predict_set.jsonl").write_text("\n".join(lines + extra) + "\n")
    return {"n": len(lines), "n1": len(lines) + 1, "cid": json.loads(lines[3])["creative_id"]}


def _repeat_users(d):
    lines = (d / "eval/predict_seq.jsonl").read_text().splitlines()
    (d / "eval/predict_seq.jsonl").write_text("\n".join(lines + [lines[0], lines[2]]) + "\n")
    (d / "eval/predict_seq_offsets.pkl").unlink()
    first = json.loads((d / "eval/ground_truth.jsonl").read_text().splitlines()[0])["user_id"]
    return {"n": len(lines), "u1": first}       # ground_truth.jsonl lists the users in predict_seq order


def _result_ok(users):
    """result.json answers every line, and no top-k repeats a creative id."""
    def check(d, p, subs):
        r = json.loads((d / "result/result.json").read_text())
        assert len(r["user"]) == users(subs) == len(r["top10s"])
        assert all(len(t) == 10 and len(set(t)) == 10 for t in r["top10s"])
    return check


OUTPUTS = ("query.fbin", "embedding.fbin", "id.u64bin", "retrive_id2creative_id.json", "result.json")


def _earlier_outputs(d):
    for name in OUTPUTS:
        put(d / "result" / name, f"{name} of an earlier run")


def _no_new_outputs(d, p, subs):
    """A failed inference publishes none of its outputs (those that fitted were staged, then removed)."""
    assert sorted(q.name for q in (d / "result").iterdir() if q.name != ".lock") == ["result.json"]


def _nan_weights(d):
    """The checkpoint of a diverged run: every float weight NaN."""
    f = next((d / "ckpt").glob("global_step*/model.pt"))
    state = torch.load(f, weights_only=True)
    state["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, f)
    return {"file": f}


EV = "{d}/eval/predict_set.jsonl"
RUNS += [
    Run("infer_top_k_zero", "infer", _inf("--top_k", "0"), "error: --top_k 0: expected an integer >= 1"),
    Run("infer_top_k_text", "infer", _inf("--top_k", "ten"),
        "error: argument --top_k: invalid int value: 'ten' (see infer.py --help)"),
    Run("infer_batch_size_zero", "infer", _inf("--batch_size", "0"), "error: --batch_size 0: expected an integer >= 1"),
    Run("infer_batch_size_2pow63", "infer", _inf("--batch_size", str(2**63)),
        f"error: --batch_size {2**63}: expected an integer <= 1000000"),
    Run("infer_num_workers_huge", "infer", _inf("--num_workers", "100000"),
        "error: --num_workers 100000: expected an integer <= 1024"),
    Run("infer_cand_batch_size_negative", "infer", _inf("--cand_batch_size", "-4"),
        "error: --cand_batch_size -4: expected an integer >= 1"),
    Run("infer_num_workers_negative", "infer", _inf("--num_workers", "-1"),
        "error: --num_workers -1: expected an integer >= 0"),
    Run("infer_device_unknown", "infer", _inf("--device", "tpu"), "error: --device tpu: expected cpu or cuda (cuda:N)"),
    Run("infer_force_timefeat_text", "infer", _inf(env={"FORCE_USE_TIMEFEAT": "yes"}),
        "error: FORCE_USE_TIMEFEAT='yes': expected 0 or 1 (or unset: as the checkpoint was trained)"),
    Run("infer_result_path_is_file", "infer", _inf(env={"EVAL_RESULT_PATH": "{d}/result/result.json"}),
        "error: {d}/result/result.json: not a folder (EVAL_RESULT_PATH), expected a folder to write into"),
    Run("infer_eval_path_missing", "infer", _inf(env={"EVAL_DATA_PATH": "{d}/nowhere"}),
        "error: {d}/nowhere: folder not found (EVAL_DATA_PATH), expected predict_seq.jsonl and predict_set.jsonl"),
    Run("infer_cid_2pow63", "infer", _inf(edit=_set_line("eval/predict_set.jsonl", 4, lambda o: o.update(creative_id=2**63))),
        f"error: {EV}:4: creative_id is {2**63}, expected a non-negative int below 2^63"),
    Run("infer_rid_2pow64", "infer", _inf(edit=_set_line("eval/predict_set.jsonl", 2, lambda o: o.update(retrieval_id=2**64))),
        f"error: {EV}:2: retrieval_id is {2**64}, expected a non-negative int below 2^63"),
    Run("infer_cid_negative", "infer", _inf(edit=_set_line("eval/predict_set.jsonl", 7, lambda o: o.update(creative_id=-7))),
        f"error: {EV}:7: creative_id is -7, expected a non-negative int below 2^63"),
    Run("infer_cid_float", "infer", _inf(edit=_set_line("eval/predict_set.jsonl", 1, lambda o: o.update(creative_id=5.0))),
        f"error: {EV}:1: creative_id is 5.0, expected a non-negative int below 2^63"),
    Run("infer_predict_set_duplicate_key", "infer", _inf(edit=lambda d: put(
        d / "eval/predict_set.jsonl", '{"creative_id": 1, "retrieval_id": 0, "creative_id": 2, "features": {}}\n') and None),
        f'error: {EV}:1: key "creative_id" appears twice in one object, expected each key once'),
    Run("infer_predict_set_is_folder", "infer",
        _inf(edit=lambda d: (d / "eval/predict_set.jsonl").unlink() or (d / "eval/predict_set.jsonl").mkdir()),
        f"error: {EV}: a folder, expected the candidate pool file"),
    Run("infer_predict_user_id_huge", "infer",
        _inf(edit=lambda d: _set_line("eval/predict_seq.jsonl", 2, lambda o: o[0].__setitem__(0, 2**64))(d)
             or {"nrec": len(json.loads((d / "eval/predict_seq.jsonl").read_text().splitlines()[1]))}),
        "error: {d}/eval/predict_seq.jsonl:2: record 1 of {nrec}: user_id is 18446744073709551616, expected a "
        "non-negative int (re-id) or a non-empty string (raw id)"),
    Run("infer_duplicate_creative_ids", "infer", _inf(edit=_dup_candidates),
        "notice: {d}/eval/predict_set.jsonl: 3 lines repeat a creative id already listed (first: line {n1}, "
        "creative_id {cid} of line 4); each creative id is kept once, with its first line's retrieval_id "
        "({n} distinct candidates)", 0, _result_ok(lambda s: 10)),
    Run("infer_repeated_users", "infer", _inf(edit=_repeat_users),
        "notice: {d}/eval/predict_seq.jsonl: 2 lines repeat a user already listed (10 distinct users in 12 lines; "
        "first: user {u1} on lines 1 and 11); each line is answered in order", 0, _result_ok(lambda s: 12)),
    Run("infer_full_disk", "infer", _inf(fsize=3000, cache=True),     # query.fbin fits, embedding.fbin does not
        "error: {d}/result/embedding.fbin: File too large", check=_no_new_outputs),
    # an earlier run's whole set of outputs: a failed run leaves every one of them as it was (nothing lost)
    Run("infer_full_disk_keeps_earlier_set", "infer", _inf(fsize=3000, cache=True, edit=_earlier_outputs),
        "error: {d}/result/embedding.fbin: File too large"),
    Run("infer_full_disk_cold_cache", "infer", _inf(fsize=100),
        "error: {d}/cache/mm/emb_81.npy: File too large", check=_no_new_outputs),
    Run("infer_checkpoint_diverged", "infer", _inf(edit=_nan_weights),
        "error: {file}: the model's candidate vectors hold NaN or inf: its training diverged; train it again with a "
        "lower --lr or with --clip_norm set (main.py)"),
]


# --- main.py (a case for what still misbehaves gets marks=(pytest.mark.xfail(strict=True, ...),)) ---

def _train(*args, env=None, fsize=None, vmem=None):
    """main.py on copies of the demo folders; vmem: an address-space limit (allocations beyond it
    fail at once, as on a machine without that much memory, instead of paging this one out)."""
    def setup(d, base):
        shutil.copytree(base / "data/train", d / "train")
        shutil.copytree(base / "data/eval", d / "eval")
        e = _env(d, d / "ckpt_out")
        e.update({k: v.format(d=d) for k, v in (env or {}).items()})
        return {"args": list(args), "env": e, **({"fsize": fsize} if fsize else {}), **({"vmem": vmem} if vmem else {})}
    return setup


def _stderr_matches(pattern):
    """check: stderr is exactly one line matching `pattern` (for messages with a machine-dependent part)."""
    def check(d, p, subs):
        assert re.fullmatch(pattern + "\n", p.stderr), p.stderr
    return check


def _no_checkpoint(d, p, subs):
    assert not list((d / "ckpt_out").rglob("model.pt")), "a diverged run saved a checkpoint"


RUNS += [
    Run("train_data_path_is_file", "train", _train(env={"TRAIN_DATA_PATH": "{d}/train/seq.jsonl"}),
        "error: {d}/train/seq.jsonl: a file, expected a folder (TRAIN_DATA_PATH) holding seq.jsonl, seq_offsets.pkl, "
        "indexer.pkl and item_feat_dict.json"),
    Run("train_data_path_missing", "train", _train(env={"TRAIN_DATA_PATH": "{d}/nowhere"}),
        "error: {d}/nowhere: folder not found (TRAIN_DATA_PATH), expected seq.jsonl, seq_offsets.pkl, "
        "indexer.pkl and item_feat_dict.json"),
    Run("train_ckpt_path_is_file", "train", _train(env={"TRAIN_CKPT_PATH": "{d}/train/seq.jsonl"}),
        "error: {d}/train/seq.jsonl: cannot write there (TRAIN_CKPT_PATH: File exists)"),
    Run("train_batch_size_huge", "train", _train("--batch_size", str(2**63)),
        f"error: --batch_size {2**63}: expected an integer <= 1000000"),
    Run("train_hidden_units_huge", "train", _train("--hidden_units", "1000000"),
        "error: --hidden_units 1000000: expected an integer <= 65536"),
    Run("train_maxlen_huge", "train", _train("--maxlen", "100000000"),
        "error: --maxlen 100000000: expected an integer <= 1000000"),
    Run("train_num_neg_huge", "train", _train("--num_neg", "10000000000"),
        "error: --num_neg 10000000000: expected an integer <= 1000000"),
    Run("train_max_steps_2pow63", "train", _train("--max_steps", str(2**63)),
        f"error: --max_steps {2**63}: expected an integer <= 1000000000000"),
    Run("train_seed_negative", "train", _train("--seed", "-1"), "error: --seed -1: expected an integer >= 0"),
    Run("train_valid_seed_2pow32", "train", _train("--valid_seed", str(2**32)),
        f"error: --valid_seed {2**32}: expected an integer <= {2**32 - 1}"),
    # within the caps, but more than this process may allocate (a 6 GB address-space limit): the
    # 1M x 4096 position table fails to allocate while the model is built
    Run("train_out_of_memory", "train", _train("--maxlen", "1000000", "--hidden_units", "4096", vmem=6 << 30),
        None, 3, _stderr_matches(r"error: out of memory building the data and model \(.*allocate.*\); lower "
                                 r"--batch_size \(16\), --maxlen \(1000000\) or --hidden_units \(4096\)")),
    # a huge LR: the weights blow up after the first step; with one non-finite step allowed the loop stops,
    # with the default 20 the epoch ends and validation finds NaN vectors. Each says the run diverged
    Run("train_diverged_loss", "train", _train("--lr", "1e30", "--max_nonfinite_steps", "1"),
        None, 3, lambda d, p, s: (_stderr_matches(
            r"error: the run diverged: stopped at step \d+, 1 optimizer steps in a row had a NaN or inf loss; lower "
            r"--lr \(now 1e\+30\) or --clip_norm \(now 1\), or check the data")(d, p, s), _no_checkpoint(d, p, s))),
    Run("train_diverged_validation", "train", _train("--lr", "1e30", "--clip_norm", "0"),
        None, 3, _stderr_matches(
            r"error: the run diverged: at step \d+ the model's (candidate vectors|user queries) hold NaN or inf "
            r"\(validation\); lower --lr \(now 1e\+30\) or set --clip_norm \(e.g. 1.0; now off\)")),
    Run("train_flag_not_int", "train", _train("--num_epochs", "two"),
        "error: argument --num_epochs: invalid int value: 'two' (see main.py --help)"),
    Run("train_flag_unknown", "train", _train("--hiden_units", "16"),
        "error: unrecognized arguments: --hiden_units 16 (see main.py --help)"),
    Run("train_full_disk", "train", _train(fsize=20000),      # the caches fit, the first checkpoint does not
        "error: {d}/ckpt_out/global_step4/model.pt: File too large",
        check=lambda d, p, s: not list((d / "ckpt_out").rglob("model.pt")) or pytest.fail("a model.pt was left")),
]


# ---------------------------------------------------------------------------------------------
# Fixtures: demo data, one trained checkpoint, every subprocess case run up front in parallel
# ---------------------------------------------------------------------------------------------

def _run(cmd, env, fsize=None, vmem=None):
    """Run a script; fsize: a file-size limit (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk);
    vmem: an address-space limit in bytes (allocations beyond it fail)."""
    def limit():
        if fsize:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if vmem:
            resource.setrlimit(resource.RLIMIT_AS, (vmem, vmem))
    return subprocess.run([PY, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if fsize or vmem else None)


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
    """Copy the valid folders for case c, break them; -> (case dir, ckpt dir, substitutions). An
    inference case's EVAL_RESULT_PATH holds an earlier result.json, which an error must leave alone."""
    cid, script, how, corrupt, expected, args = c
    d = root / cid
    shutil.copytree(base / "data/train", d / "train")
    shutil.copytree(base / "data/eval", d / "eval")
    ck = base / "ckpt"
    if script == "infer":
        ck = d / "ckpt"
        shutil.copytree(base / "ckpt", ck)
        put(d / "result/result.json", '{"from": "an earlier run"}')
    subs = corrupt(d / "train", d / "eval", ck) or {}
    return d, ck, {"train": d / "train", "eval": d / "eval", "ckpt": ck, **subs}


def _cmd(script, d, args):
    if script == "train":
        return [*TRAIN, *args]
    if script == "infer":
        return ["infer.py", *args]
    return ["precompute_ctr.py", "--seq_path", d / "train/seq.jsonl", "--output_dir", d / "ctr_out", *args]


def snapshot(d):
    """{path: bytes} of every file under d (but folder locks, which name their latest holder)."""
    return {p: p.read_bytes() for p in Path(d).rglob("*") if p.is_file() and p.name != ".lock"}


OUTPUT_DIRS = ("out", "result")      # where a successful run may write; everything else is input


def assert_nothing_lost(d, before, failed):
    """Every file that existed before is unchanged (after a success: the inputs), and no temporary
    file (an atomic write's, a write test's) is left behind."""
    for p, data in before.items():
        if failed or p.relative_to(d).parts[0] not in OUTPUT_DIRS:
            assert p.exists(), f"{p} was deleted"
            assert p.read_bytes() == data, f"{p} was changed"
    left = [p for p in Path(d).rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".write_test.")]
    assert not left, left


ALL = [_case(c) for c in CASES]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid demo folders, a checkpoint trained on them and the results of every subprocess case.

    The subprocesses run three at a time; the training, CTR and torch-free cases start before the
    shared checkpoint is trained (in this process: a subprocess would pay the torch import again),
    the inference cases once it exists. -> (base folder, {CASES id: (process, substitutions,
    snapshot)}, {RUNS id: (case dir, process or None, substitutions, snapshot, skip reason)})."""
    import make_demo_data
    b = tmp_path_factory.mktemp("valid")
    root = tmp_path_factory.mktemp("cases")
    runs_root = tmp_path_factory.mktemp("runs")
    assert make_demo_data.main(["--out", str(b / "data"), "--users", "60", "--items", "80", "--eval_users", "10"]) == 0
    cli = [p.values for p in ALL if p.values[2] == "cli"]
    jobs, runs = {}, {}
    with ThreadPoolExecutor(3) as pool:
        def submit(c):
            d, ck, subs = _prepare(b, root, c)
            jobs[c[0]] = (pool.submit(_run, _cmd(c[1], d, c[5]), _env(d, ck)), subs, snapshot(d))

        def submit_run(r):
            d = runs_root / r.cid
            d.mkdir()
            got = r.setup(d, b)
            if got.get("skip"):
                runs[r.cid] = (d, None, {}, {}, got["skip"])
                return
            cmd = [*SCRIPTS[r.script], *got["args"]]
            env = got.get("env") or dict(os.environ)
            runs[r.cid] = (d, pool.submit(_run, cmd, env, got.get("fsize"), got.get("vmem")), got.get("subs", {}),
                           snapshot(d), None)
        for c in cli:
            if c[1] != "infer":
                submit(c)
        for r in RUNS:
            if r.script not in NEEDS_CKPT:
                submit_run(r)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in _env(b / "data", b / "ckpt").items():
                mp.setenv(k, v)
            mp.setenv("TRAIN_CKPT_PATH", str(b / "ckpt"))
            _train_here(TRAIN[1:])
        for c in cli:
            if c[1] == "infer":
                submit(c)
        for r in RUNS:
            if r.script in NEEDS_CKPT:
                submit_run(r)
    return (b, {cid: (job.result(), subs, snap) for cid, (job, subs, snap) in jobs.items()},
            {cid: (d, job and job.result(), subs, snap, skip) for cid, (d, job, subs, snap, skip) in runs.items()})


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def _fill(template, subs):
    """Put the case's paths (and other variable parts) into {name} slots; other braces stay."""
    return re.sub(r"\{(\w+)\}", lambda m: str(subs.get(m.group(1), m.group(0))), template)


@pytest.mark.parametrize("cid, script, how, corrupt, expected, args", ALL)
def test_bad_input(cid, script, how, corrupt, expected, args, world, tmp_path, monkeypatch):
    base, cli_results, _ = world
    if how == "cli":
        p, subs, before = cli_results[cid]
        want = _fill(expected, subs)
        assert "Traceback" not in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.endswith("\n"), p.stderr
        assert p.stderr.rstrip("\n") == want
        assert p.returncode == 2
        assert_nothing_lost(Path(subs["train"]).parent, before, failed=True)
        return
    # in process: the same entry point the script's main() calls, with the same environment
    d, ck, subs = _prepare(base, tmp_path, (cid, script, how, corrupt, expected, args))
    before = snapshot(d)
    for k, v in _env(d, ck).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(L.DataError) as e:
        if script == "train":
            _train_here([*TRAIN[1:], *args])
        else:
            import infer
            infer.infer(argv=["--num_workers", "0", *args])
    assert str(e.value) == _fill(expected, subs)
    assert_nothing_lost(d, before, failed=True)


CULPRITS = ("--", "_PATH", "FORCE_USE_TIMEFEAT")


@pytest.mark.parametrize("case", [pytest.param(r, id=r.cid, marks=r.marks) for r in RUNS])
def test_entry_point(case, world):
    """One bad input through one script's real command line: the exit code, exactly the promised
    stderr (one "error: " line naming the file and line or the flag; or, for an input the script
    still handles, "warning: " / "notice: " lines and exit 0), no traceback, nothing lost."""
    d, p, subs, before, skip = world[2][case.cid]
    if skip:
        pytest.skip(skip)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == case.code, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    if case.expected is None:
        assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    else:
        want = _fill(case.expected, {"d": d, **subs})
        assert p.stderr == (want + "\n" if want else ""), p.stderr
    for line in lines:      # each message names its culprit: a file of the case, a flag or a variable
        assert str(d) in line or any(k in line for k in CULPRITS), line
    assert_nothing_lost(d, before, failed=case.code != 0)
    if case.check:
        case.check(d, p, subs)


def test_corpus_size():
    """The issue asks for at least 20 malformed inputs through the real command lines, round two
    for at least 100 over every entry point (cases that may be skipped, or that are known to
    misbehave, not counted)."""
    assert sum(1 for c in CASES if c[2] == "cli" and len(c) < 7) >= 20
    counted = [r for r in RUNS if not r.marks and "unreadable" not in r.cid]
    assert sum(1 for c in CASES if c[2] == "cli" and len(c) < 7) + len(counted) >= 100
    assert {r.script for r in counted} == set(SCRIPTS)
    assert len({r.cid for r in RUNS} | {c[0] for c in CASES}) == len(RUNS) + len(CASES)


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


def test_ctrl_c_with_a_worker_saves_and_a_rerun_resumes(world, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, the DataLoader worker included) during training:
    a checkpoint is saved, one line and exit code 130, no traceback (the worker ignores it), and
    the same command resumes and finishes; once finished, rerunning it does nothing."""
    import time
    b = world[0]
    e = dict(_env(b / "data", tmp_path / "ck"), TRAIN_CKPT_PATH=str(tmp_path / "ck"), USER_CACHE_PATH=str(tmp_path / "c"),
             TRAIN_LOG_PATH=str(tmp_path / "log"), TRAIN_TF_EVENTS_PATH=str(tmp_path / "tb"))
    # 8 epochs of 4 steps: the signal lands long before the end, however fast the machine
    cmd = [PY, *TRAIN, "--num_workers", "1", "--num_epochs", "8", "--ckpt_every_steps", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 300        # a guard against a hang, not a timed assertion
    while not list((tmp_path / "ck").glob("global_step*/meta.json")):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert p.returncode == 130, err
    saved = re.fullmatch(r"stopped by SIGINT: saved (\S+); rerun the same command to continue\n", err)
    assert saved, err
    step = int(re.search(r"global_step(\d+)$", saved.group(1)).group(1))
    assert (Path(saved.group(1)) / "meta.json").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert f"resumed from {saved.group(1)}" in again.stdout and f"step {step}" in again.stdout, again.stdout
    last = max(int(q.name[len("global_step"):]) for q in (tmp_path / "ck").glob("global_step*"))
    assert last > step
    done = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stdout + done.stderr


def test_infer_outputs_are_published_all_or_none(tmp_path, monkeypatch):
    """infer.py's outputs stay under temporary names until all are written; should a rename then
    fail midway, no mix of two runs is left: every file of the set is removed, and the error says so."""
    import errno
    import infer
    folder = tmp_path / "result"
    names = ("query.fbin", "embedding.fbin", "result.json")
    for n in names:
        put(folder / n, f"{n} of an earlier run")
    out = infer.OutputSet(str(folder))
    for n in names:
        out.write(n, lambda p, n=n: put(p, f"{n} of this run"))
    assert all((folder / n).read_text() == f"{n} of an earlier run" for n in names)     # nothing replaced yet
    real, calls = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(L.PUBLISH_JOURNAL):       # the journal, written before the renames
            return real(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", src, None, dst)
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(L.DataError) as e:
        out.publish()
    assert str(e.value) == (f"{folder}/embedding.fbin: Input/output error; removed the outputs of this run (1 already "
                            f"renamed) and the earlier ones, so {folder} holds no mix of two runs: run again")
    assert list(folder.iterdir()) == []
    # a failed write names the final file and leaves the earlier set alone
    for n in names:
        put(folder / n, f"{n} of an earlier run")
    out = infer.OutputSet(str(folder))
    out.write("query.fbin", lambda p: put(p, "new"))

    def full_disk(p):
        put(p, "half")
        raise OSError(errno.ENOSPC, "No space left on device", p)
    with pytest.raises(OSError) as e:
        out.write("embedding.fbin", full_disk)
    assert L.os_error(e.value) == f"{folder}/embedding.fbin: No space left on device"
    out.discard()
    assert {q.name: q.read_text() for q in folder.iterdir()} == {n: f"{n} of an earlier run" for n in names}


def test_infer_worker_timeout_is_one_line(monkeypatch):
    """A DataLoader worker that sends no batch in time (validation.WORKER_TIMEOUT_S, 600 s; 1 s here)
    stops the user export with one line naming --num_workers, not a hang or a traceback."""
    import time
    import types

    import validation

    class Stuck(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            time.sleep(8)
            return {}
    monkeypatch.setattr(validation, "WORKER_TIMEOUT_S", 1)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(hidden_units=4), vector_dim=4)
    with pytest.raises(L.DataError) as e:
        validation.embed_users(model, Stuck(), None, torch.device("cpu"), batch_size=1, num_workers=1)
    assert str(e.value) == ("--num_workers 1: no batch from the DataLoader workers in 1 s (a worker hung or is "
                            "starved); run again, or with --num_workers 0")


def test_validation_nan_is_a_diverged_run(monkeypatch):
    """NaN vectors found by validation stop training with the flags to change (TrainingError,
    exit 3), not retrieval's "query: vectors hold NaN"."""
    import types

    import config
    import main
    import training
    import validation

    def diverged(*a, **k):
        validation.check_finite(candidate_vectors=np.ones((3, 2), np.float32),
                                user_queries=np.array([[np.inf]], np.float32))
    monkeypatch.setattr(validation, "holdout_metrics", diverged)
    cfg = config.from_args(main.get_args(["--lr", "0.001", "--clip_norm", "0"]))
    s = types.SimpleNamespace(holdout=object(), model=None, table=None, device=None, cfg=cfg, trained=None,
                              holdout_cache=None)
    with pytest.raises(main.TrainingError) as e:
        main.validate(s, training.TrainState(step=7), None)
    assert str(e.value) == ("the run diverged: at step 7 the model's user queries hold NaN or inf (validation); "
                            "lower --lr (now 0.001) or set --clip_norm (e.g. 1.0; now off)")
