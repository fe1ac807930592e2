"""Readers and feature construction: the real TencentGR fragments, quirks of the contract, safety."""
import datetime
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import dataset as D
import dataset_packed as P
import layout as L

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taac_sample"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/taac_sample not present")


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    """A training folder over the real 88-line fragment (files stay outside the repo)."""
    if not SHARED.exists():
        pytest.skip("../shared not present")
    d = tmp_path_factory.mktemp("taac")
    os.symlink(SHARED / "seq_head88.jsonl", d / "seq.jsonl")
    with open(d / "seq_offsets.pkl", "wb") as f:
        pickle.dump(pickle.load(open(SHARED / "seq_offsets.pkl", "rb"))[:88], f)
    os.symlink(SHARED / "indexer.pkl", d / "indexer.pkl")
    feats = {}
    for line in open(SHARED / "seq_head88.jsonl"):
        for r in json.loads(line):
            if r[1] is not None:
                feats[str(r[1])] = r[3]
    (d / "item_feat_dict.json").write_text(json.dumps(feats))
    os.makedirs(d / "creative_emb" / "emb_81_32")
    os.symlink(SHARED / "creative_emb" / "emb_81_32" / "part-00000_head479", d / "creative_emb" / "emb_81_32" / "part-00000")
    return d


@needs_shared
def test_real_fragment_reads_every_line_and_quirk(sample_dir):
    offsets = L.read_offsets(sample_dir / "seq_offsets.pkl")
    lines = L.LineReader(sample_dir / "seq.jsonl", offsets)
    n_events, n_null, profiles = 0, 0, 0
    raw = [json.loads(l) for l in open(sample_dir / "seq.jsonl")]
    for i in range(len(lines)):
        records, where = lines[i]
        assert records == raw[i]
        user, uf, events = L.parse_user_records(records, where)
        n_events += len(events)
        n_null += sum(r[1] is not None and r[4] is None for r in records)
        profiles += uf is not None
        assert all(e[2] in (0, 1) for e in events)     # null action -> exposure
    assert n_events == 7956 and n_null == 103 and profiles == 88


@needs_shared
def test_real_fragment_trains_through_the_packed_path(sample_dir, tmp_path):
    cfg = D.DataConfig(maxlen=20, mm_emb_id=["81"])
    cfg, table, builder, seq, offsets = D.load_train_data(sample_dir, cfg, tmp_path / "cache")
    assert set(cfg.item_sparse) == {"100", "101", "102", "111", "112", "114", "115", "116", "117", "118",
                                    "119", "120", "121", "122"}
    assert set(cfg.user_sparse) == {"103", "104", "105", "109"} and set(cfg.user_array) <= {"106", "107", "108", "110"}
    assert cfg.item_sparse["111"] == 58734 + 1 and cfg.num_items == 58734 and cfg.mm_dims == {"81": 32}
    ds = D.SeqDataset(seq, offsets, builder)
    batch = P.PackedCollate(table)([ds[i] for i in range(4)])
    batch.update(P.sample_negatives(table, 7, cfg.num_items))
    assert batch["seq_inv"].shape == (4, 21) and batch["neg_id"].shape == (7,)
    assert batch["seq_sparse"].shape == (int(batch["seq_inv"].max()) + 1, 14)
    assert batch["seq_mm_81"].shape == (int(batch["seq_inv"].max()) + 1, 32)
    # distinct-item packing is lossless: gathering per token gives the same inputs
    rows = np.stack([ds[i]["seq_row"] for i in range(4)])
    np.testing.assert_array_equal(batch["seq_sparse"][batch["seq_inv"]].numpy(), table.sparse[rows])
    np.testing.assert_array_equal(batch["pos_id"][batch["pos_inv"]].numpy(), batch["pos_row"].numpy())
    # a multimodal vector in the table equals the shard's vector for that creative id
    first = json.loads(open(sample_dir / "creative_emb" / "emb_81_32" / "part-00000").readline())
    row = table.row_of_cid[first["anonymous_cid"]]
    got = table.gather(np.array([row]), "x_")
    np.testing.assert_allclose(got["x_mm_81"][0].numpy(), np.float32(first["emb"]))
    assert bool(got["x_mm_mask"][0, 0])
    # the profile record's timestamp never enters: every token time is an event time
    records, _ = L.LineReader(seq, offsets)[0]
    prof_ts = [r[5] for r in records if r[1] is None][0]
    assert prof_ts not in ds[0]["ts"].tolist()


def test_offsets_as_dict_and_list(tmp_path):
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({2: 30, 1: 0, 3: 55}))
    (tmp_path / "b.pkl").write_bytes(pickle.dumps([0, 30, 55]))
    assert L.read_offsets(tmp_path / "a.pkl") == L.read_offsets(tmp_path / "b.pkl") == [0, 30, 55]


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(L.DataError, match="refused to load"):
        L.load_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()
    from collections import defaultdict
    ok = {"f": defaultdict(dict, {"1": {5: 1}}), "a": np.arange(3, dtype=np.float32)}
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(ok))
    back = L.load_pickle(tmp_path / "ok.pkl")
    assert back["f"]["1"] == {5: 1} and back["a"].tolist() == [0.0, 1.0, 2.0]


def test_time_features_hand_computed():
    ts = np.array([1745813860, 1745813860 + 7, 1745813860 + 7 + 86400 * 3])
    tf = D.time_features(ts)
    for j, t in enumerate(ts):
        dt = datetime.datetime.fromtimestamp(int(t), datetime.timezone(datetime.timedelta(hours=8)))
        assert tf["hour"][j] == dt.hour + 1 and tf["weekday"][j] == dt.isoweekday()
        assert tf["week"][j] == (dt.timetuple().tm_yday - 1) // 7 + 1
    # gap to the PREVIOUS event: first has none (bucket 1), then floor(log2(1 + 7)) + 2 = 5
    assert tf["gap_bucket"].tolist() == [1, 5, 2 + int(np.floor(np.log2(1 + 86400 * 3)))]
    assert tf["gap_log"][0] == 0 and tf["gap_log"][1] > 0


def test_encode_feats_maps_strings_missing_and_out_of_vocab_to_zero():
    sp, ar = D.encode_feats([{"1": 3, "2": "new", "9": [1, 2]}, None, {"1": 99, "9": [2, "x", 3, 1, 1]}],
                            {"1": 5, "2": 4}, {"9": 4}, 3)
    assert sp.tolist() == [[3, 0], [0, 0], [0, 0]]
    assert ar[:, 0].tolist() == [[1, 2, 0], [0, 0, 0], [2, 3, 1]]


def _tiny_builder(**kw):
    cfg = D.DataConfig(maxlen=4, num_users=3, num_items=6, item_sparse={"100": 3}, user_sparse={"103": 3}, **kw)
    idx = {"u": {"user_a": 1}, "i": {100 + r: r for r in range(1, 7)}, "f": {}}
    table = D.ItemTable(cfg, idx, {str(r): {"100": 1 + r % 2} for r in range(1, 7)})
    return D.SequenceBuilder(cfg, table, idx["u"]), table


def test_training_sequence_targets_are_next_events_and_window_is_newest():
    b, _ = _tiny_builder()
    events = [(r, None, r % 2, 1000 + 10 * r) for r in range(1, 7)]     # 6 events, maxlen 4
    s = b.build(1, {"103": 2}, events, train=True)
    # window = events 2..5 (0-based 1..4) after the user token; targets shift by one
    assert s["token_type"].tolist() == [1, 2, 2, 2, 2]
    assert s["seq_row"].tolist() == [0, 2, 3, 4, 5] and s["pos_row"].tolist() == [2, 3, 4, 5, 6]
    assert s["pos_action"].tolist() == [1, 2, 1, 2, 1] and s["action"].tolist() == [0, 1, 2, 1, 2]
    inf = b.build(1, {"103": 2}, events, train=False)                  # newest event is context
    assert inf["seq_row"].tolist() == [0, 3, 4, 5, 6] and "pos_row" not in inf
    short = b.build("user_new", None, events[:2], train=False)         # unseen user id -> 0
    assert short["token_type"].tolist() == [0, 0, 1, 2, 2] and short["user_id"] == 0


def test_cold_candidates_extend_the_table():
    b, table = _tiny_builder()
    rows = table.extend([103, 999, 1000, 999], [{}, {"100": 2}, {"100": "new"}, {"100": 2}])
    assert rows.tolist() == [3, 7, 8, 7] and table.id[7] == -1 and table.sparse[7].tolist() == [2]
    assert b.item_rows([3, 999, 12345, None]).tolist() == [3, 7, 0, 0]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "out.json"
    L.dump_json({"a": 1}, p)
    with pytest.raises(RuntimeError):
        with L.atomic_write(p) as f:
            f.write("partial")
            raise RuntimeError("crash")
    assert json.loads(p.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1
    assert (p.stat().st_mode & 0o644) == 0o644


def test_target_item_ctr_is_leave_one_out_and_user_ctr_uses_only_the_past():
    from precompute_ctr import ctr_value
    meta = {"alpha": 1.0, "beta": 9.0, "logit": False, "mean": 0.1, "std": 0.05}
    cfg = D.DataConfig(maxlen=4, num_users=3, num_items=6, use_userctr=True, use_itemctr=True,
                       ctr_meta={"user": meta, "item": meta})
    idx = {"u": {}, "i": {100 + r: r for r in range(1, 7)}, "f": {}}
    table = D.ItemTable(cfg, idx, {str(r): {} for r in range(1, 7)}, item_ctr={2: (5, 10, 0.0), 3: (2, 4, 0.0)})
    b = D.SequenceBuilder(cfg, table, {})
    s = b.build(1, None, [(2, None, 0, 10), (3, None, 1, 20), (2, None, 1, 30)], train=True)
    # targets: item 2 (exposure), item 3 (click), item 2 (click); each target's own event is
    # removed from that item's counts: events - 1, and clicks - 1 when the target is a click
    assert s["pos_row"].tolist()[-3:] == [2, 3, 2]
    batch = P.PackedCollate(table)([s])
    pos_ctr = batch["pos_ctr"][batch["pos_inv"][0, -3:]]
    np.testing.assert_allclose(pos_ctr, np.float32([ctr_value(5, 9, meta), ctr_value(1, 3, meta),
                                                    ctr_value(4, 9, meta)]))
    # history tokens carry the full item CTR (the value inference sees)
    np.testing.assert_allclose(table.ctr_z[[2, 3]], np.float32([ctr_value(5, 10, meta), ctr_value(2, 4, meta)]))
    # running user CTR: counts up to and including each token's event, never later ones
    np.testing.assert_allclose(s["user_ctr"][-3:], np.float32([ctr_value(0, 0, meta), ctr_value(0, 1, meta),
                                                               ctr_value(1, 2, meta)]))


def test_rank_packages_use_only_events_before_the_target():
    b, table = _tiny_builder()
    table.set_popularity(np.array([0, 9, 1, 9, 1, 9, 1], float), 5)       # odd rows hot
    b.rank_packages = True
    rng = np.random.default_rng(0)
    events = [(r, None, int(r in (2, 3)), 1000 + 10 * r) for r in (1, 2, 3, 4, 5, 6)]
    for _ in range(20):
        s = b.build(1, None, events, train=True, rng=rng)
        T = len(s["token_type"])
        for t in range(T):
            if s["pos_row"][t] == 0:
                assert (s["pkg_grade"][t] == 0).all()
                continue
            tgt = [e[0] for e in events].index(s["pos_row"][t])          # rows are distinct here
            before = {e[0]: e for e in events[:tgt]}
            for slot, (row, g) in enumerate(zip(s["pkg_row"][t], s["pkg_grade"][t])):
                if slot == 4:
                    assert g == 1 and 1 <= row <= 6                       # random catalogue item
                    continue
                if g == 0:
                    # masked only when no event of that kind exists before the target
                    want_click, want_hot = slot in (0, 1), slot in (1, 3)
                    assert not any((e[2] >= 1) == want_click and table.hot[r] == want_hot for r, e in before.items())
                    continue
                assert row in before, "package item from the target or later"
                assert (before[row][2] >= 1) == (slot in (0, 1)) and g == (3 if slot in (0, 1) else 2)
                assert table.hot[row] == (slot in (1, 3))
