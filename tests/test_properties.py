"""Property-based tests (hypothesis) of the record reader (LineReader + parse_user_records +
read_offsets) and of the .fbin / .u64bin files: valid input round-trips against a naive
reference, and anything else is refused with a one-line DataError, never another exception.

The plain .fbin round trip of random float matrices belongs to retrieval_torch's own tests; here
the binary properties are bit-exactness on edge values and refusing every wrong file size.
"""
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import layout as L  # noqa: E402
import retrieval_torch as R  # noqa: E402

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# Strategies: valid TencentGR lines
# ---------------------------------------------------------------------------------------------

ids = st.integers(0, 2**40)
fids = st.sampled_from(["100", "103", "106", "112", "115", "121"])
value = st.one_of(st.integers(-5, 2**31), st.text(max_size=5),
                  st.lists(st.one_of(st.integers(0, 99), st.text(max_size=3)), max_size=4), st.none())
feats = st.one_of(st.none(), st.dictionaries(fids, value, max_size=4))
ts = st.integers(0, 2**33)


@st.composite
def user_line(draw):
    """(records, user id): item records plus 0-2 profile records at random places; several
    records may share a timestamp (the sort must be stable)."""
    user = draw(st.one_of(ids, st.text(min_size=1, max_size=8)))
    n_items = draw(st.integers(0, 12))
    pool = draw(st.lists(ts, min_size=1, max_size=4))          # few distinct times: many ties
    recs = [[user, draw(ids), None, draw(feats), draw(st.sampled_from([0, 1, 2, None])), draw(st.sampled_from(pool))]
            for _ in range(n_items)]
    for _ in range(draw(st.integers(0 if n_items else 1, 2))):
        recs.insert(draw(st.integers(0, len(recs))), [user, None, draw(feats), None, None, draw(ts)])
    return recs, user


def write_lines(d, lines, raw=False):
    """seq.jsonl (+ its offsets pickle) from JSON values, or from raw byte lines."""
    seq = Path(d) / "seq.jsonl"
    data = [ln if raw else json.dumps(ln).encode() for ln in lines]
    offsets, pos = [], 0
    for b in data:
        offsets.append(pos)
        pos += len(b) + 1
    seq.write_bytes(b"".join(b + b"\n" for b in data))
    (Path(d) / "seq_offsets.pkl").write_bytes(pickle.dumps(offsets))
    return seq, offsets


def naive_parse(recs):
    """Reference: item records in (timestamp, position) order, null action = 0; the last
    non-empty profile dict wins."""
    items = [(r[5], k, r) for k, r in enumerate(recs) if r[1] is not None]
    events = [(r[1], r[3], 0 if r[4] is None else r[4], r[5]) for _, _, r in sorted(items, key=lambda x: x[:2])]
    prof = [r[2] for r in recs if r[1] is None and r[2]]
    return recs[0][0], (prof[-1] if prof else None), events


# ---------------------------------------------------------------------------------------------
# Record reader
# ---------------------------------------------------------------------------------------------

@FAST
@given(st.lists(user_line(), min_size=1, max_size=6), st.booleans())
def test_valid_lines_round_trip(lines, as_dict):
    with tempfile.TemporaryDirectory() as d:
        seq, offsets = write_lines(d, [recs for recs, _ in lines])
        if as_dict:                       # converters may write {re-id: offset}, in any key order
            (Path(d) / "seq_offsets.pkl").write_bytes(pickle.dumps(dict(zip(range(len(offsets), 0, -1), offsets))))
        got = L.read_offsets(Path(d) / "seq_offsets.pkl")
        assert got == offsets
        reader = L.LineReader(seq, got)
        for i, (recs, user) in enumerate(lines):
            parsed, where = reader[i]
            assert parsed == recs and where == f"{seq}:{i + 1}"
            u, uf, events = L.parse_user_records(parsed, where)
            assert (u, uf, events) == naive_parse(recs)
            assert u == user and len(events) == sum(r[1] is not None for r in recs)
            assert all(e[2] in (0, 1, 2) for e in events)


json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                    st.text(max_size=6)),
                          lambda kids: st.one_of(st.lists(kids, max_size=7),
                                                 st.dictionaries(st.text(max_size=4), kids, max_size=4)),
                          max_leaves=30)


def only_data_errors(fn, *args):
    """Run fn; a DataError must be one line naming where it happened; anything else fails."""
    try:
        fn(*args)
    except L.DataError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        return msg
    return None


@FAST
@given(st.lists(st.one_of(st.binary(max_size=60), json_value.map(lambda v: json.dumps(v).encode())),
                min_size=1, max_size=5))
def test_garbage_lines_raise_only_data_errors(raw_lines):
    raw_lines = [b.replace(b"\n", b" ") for b in raw_lines]
    with tempfile.TemporaryDirectory() as d:
        seq, offsets = write_lines(d, raw_lines, raw=True)
        reader = L.LineReader(seq, L.read_offsets(Path(d) / "seq_offsets.pkl"))
        for i in range(len(raw_lines)):
            msg = only_data_errors(lambda: L.parse_user_records(*reader[i]))
            assert msg is None or msg.startswith(f"{seq}:{i + 1}: ")


bad_field = {
    0: st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.just(""), st.lists(st.integers(), max_size=2)),
    1: st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.text(max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
    3: st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                 st.dictionaries(fids, st.one_of(st.floats(), st.booleans(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                                                 st.lists(st.floats(), min_size=1, max_size=2)), min_size=1, max_size=2)),
    4: st.one_of(st.integers().filter(lambda a: a not in (0, 1, 2)), st.floats(), st.booleans(), st.text(max_size=3)),
    5: st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.none(), st.text(max_size=3)),
}


@FAST
@given(user_line(), st.data())
def test_one_bad_field_is_named(line, data):
    """Replacing one field of one item record by a value of the wrong type or range gives a
    DataError naming that record and field (record numbers start at 1)."""
    recs, _ = line
    items = [k for k, r in enumerate(recs) if r[1] is not None]
    assume(items)
    k = data.draw(st.sampled_from(items))
    field = data.draw(st.sampled_from(sorted(bad_field)))
    recs[k][field] = data.draw(bad_field[field])
    name = {0: "user_id", 1: "item_id", 3: "item_feat", 4: "action_type", 5: "timestamp"}[field]
    with pytest.raises(L.DataError) as e:
        L.parse_user_records(json.loads(json.dumps(recs)), "f.jsonl:7")
    msg = str(e.value)
    assert msg.startswith(f"f.jsonl:7: record {k + 1} of {len(recs)}") and name in msg, msg


@FAST
@given(st.lists(user_line(), min_size=2, max_size=5), st.data())
def test_a_moved_offset_is_refused(lines, data):
    """Moving any one offset anywhere else is refused: by read_offsets (order, end of file) or by
    LineReader when that line is read (not at a line start). Onto another line start it always
    breaks the order, so the only silent error left is a consistent but wrong offsets file."""
    with tempfile.TemporaryDirectory() as d:
        seq, offsets = write_lines(d, [recs for recs, _ in lines])
        k = data.draw(st.integers(0, len(offsets) - 1))
        new = data.draw(st.integers(0, seq.stat().st_size + 20).filter(lambda o: o != offsets[k]))
        (Path(d) / "seq_offsets.pkl").write_bytes(pickle.dumps(offsets[:k] + [new] + offsets[k + 1:]))
        with pytest.raises(L.DataError) as e:
            L.LineReader(seq, L.read_offsets(Path(d) / "seq_offsets.pkl"))[k]
        assert "\n" not in str(e.value) and str(new) in str(e.value)


@FAST
@given(st.lists(user_line(), min_size=1, max_size=4), st.integers(-3, 3).filter(bool), st.booleans())
def test_offsets_count_must_match_the_lines(lines, extra, trailing_blank):
    """Too few offsets (the last lines uncovered) or too many (past the end) are refused at load;
    blank lines after the last line are fine."""
    with tempfile.TemporaryDirectory() as d:
        seq, offsets = write_lines(d, [recs for recs, _ in lines])
        if trailing_blank:
            seq.write_bytes(seq.read_bytes() + b"\n \n")
        size = seq.stat().st_size
        assert L.read_offsets(Path(d) / "seq_offsets.pkl") == offsets
        changed = offsets[:extra] if extra < 0 else offsets + [size + j for j in range(extra)]
        assume(changed)
        (Path(d) / "seq_offsets.pkl").write_bytes(pickle.dumps(changed))
        with pytest.raises(L.DataError) as e:
            L.read_offsets(Path(d) / "seq_offsets.pkl")
        assert str(e.value).startswith(f"{Path(d) / 'seq_offsets.pkl'}: ")


# ---------------------------------------------------------------------------------------------
# .fbin / .u64bin
# ---------------------------------------------------------------------------------------------

special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, float("inf"), float("-inf"), 1.0, -2.5])


@FAST
@given(st.integers(0, 5), st.integers(1, 5), st.data())
def test_fbin_bit_exact_on_edge_values(n, dim, data):
    vals = data.draw(st.lists(st.one_of(special, st.floats(width=32, allow_nan=True)), min_size=n * dim, max_size=n * dim))
    a = np.array(vals, np.float32).reshape(n, dim)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.fbin")
        R.write_fbin(p, a)
        assert os.path.getsize(p) == 8 + 4 * n * dim
        assert np.frombuffer(open(p, "rb").read(8), "<u4").tolist() == [n, dim]
        for back in (R.read_fbin(p), R.read_fbin(p, mmap=True)):
            assert back.shape == (n, dim) and back.dtype == np.float32
            assert np.asarray(back).view(np.uint32).tolist() == a.view(np.uint32).tolist()


@FAST
@given(st.lists(st.integers(0, 2**64 - 1), max_size=12), st.integers(1, 3))
def test_u64bin_full_range_round_trip(vals, cols):
    a = np.array(vals[:len(vals) // cols * cols], np.uint64).reshape(-1, cols)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "id.u64bin")
        R.write_u64bin(p, a if cols > 1 else a.ravel())
        back = R.read_u64bin(p)
        assert back.shape == a.shape and back.dtype == np.uint64 and back.tolist() == a.tolist()


@FAST
@given(st.sampled_from(["fbin", "u64bin"]), st.integers(0, 4), st.integers(1, 4),
       st.integers(-40, 40).filter(bool))
def test_wrong_size_is_refused(kind, n, dim, delta):
    """Truncated or extended files never load: the size must be 8 + N*D*itemsize exactly."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, f"x.{kind}")
        if kind == "fbin":
            R.write_fbin(p, np.ones((n, dim), np.float32))
        else:
            R.write_u64bin(p, np.arange(n * dim, dtype=np.uint64).reshape(n, dim))
        raw = open(p, "rb").read()
        assume(len(raw) + delta >= 0)
        open(p, "wb").write(raw[:len(raw) + delta] if delta < 0 else raw + b"\0" * delta)
        with pytest.raises(L.DataError) as e:
            R.read_fbin(p) if kind == "fbin" else R.read_u64bin(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: ") and str(len(raw) + delta) in msg and "\n" not in msg
