"""Inference-time packed datasets: predict users and candidate items.

Both reuse the training feature code (dataset.SequenceBuilder, dataset.ItemTable), so a user's
tokens and an item's inputs are built exactly as in training. Cold cases of the contract are
mapped, never dropped: raw-string user ids and unseen feature values become 0 (unknown);
candidates unknown to the indexer are appended to the item table with the features the
predict set gives, and a history item with a raw creative id gets that row when it is also a
candidate (else the unknown row).
"""
import os

import numpy as np
import torch

import dataset as D


def eval_offsets(eval_dir, seq_name="predict_seq"):
    """Offsets of predict_seq.jsonl: the pickle when present, else computed by one pass."""
    seq = os.path.join(eval_dir, f"{seq_name}.jsonl")
    pkl = os.path.join(eval_dir, f"{seq_name}_offsets.pkl")
    if not os.path.isfile(seq):
        raise D.DataError(f"{seq}: file not found (looked for the predict sequences in {eval_dir})")
    if os.path.exists(pkl):
        return seq, D.read_offsets(pkl, seq)
    offsets, pos = [], 0
    with open(seq, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return seq, offsets


class PredictSeqDataset(torch.utils.data.Dataset):
    """One sample per line of predict_seq.jsonl, in file order; `_user` is the raw user id."""

    def __init__(self, eval_dir, builder, raw_user_of):
        seq, offsets = eval_offsets(eval_dir)
        if not offsets:
            raise D.DataError(f"{seq}: no predict users")
        self.lines, self.builder, self.raw_user_of = D.LineReader(seq, offsets), builder, raw_user_of

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        records, where = self.lines[i]
        user, user_feat, events = D.parse_user_records(records, where)
        s = D.with_location(where, self.builder.build, user, user_feat, events, False)
        s["_user"] = user if isinstance(user, str) else self.raw_user_of.get(user, str(user))
        s["_history"] = self.builder.item_rows([e[0] for e in events])
        return s


def read_candidates(eval_dir, known=()):
    """predict_set.jsonl -> (creative ids int64, retrieval ids int64, feature dicts).

    Every line is validated, but the feature dict is kept only for creative ids not in `known`
    (cold items; the rest get None): the item table already holds the others' features, and at
    millions of candidates the dicts would dominate memory."""
    path = os.path.join(eval_dir, "predict_set.jsonl")
    if not os.path.isfile(path):
        raise D.DataError(f"{path}: file not found (looked for the candidate pool in {eval_dir})")
    cids, rids, feats, line_of = [], [], [], {}
    for lineno, obj in D.iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or "creative_id" not in obj:
            raise D.DataError(f"{where}: expected an object with creative_id, retrieval_id, features")
        cid, rid = obj["creative_id"], obj.get("retrieval_id", len(rids))
        for name, v in (("creative_id", cid), ("retrieval_id", rid)):
            if type(v) is not int or v < 0:
                raise D.DataError(f"{where}: {name} is {D.show_json(v)}, expected a non-negative int")
        if rid in line_of:      # id.u64bin and retrive_id2creative_id.json need one row per id
            raise D.DataError(f"{where}: retrieval_id {rid} already used on line {line_of[rid]}, "
                              f"expected unique retrieval ids")
        line_of[rid] = lineno
        f = obj.get("features")
        D.check_feats(f, where, "features")
        cids.append(cid)
        rids.append(rid)
        feats.append(None if cid in known else (f or {}))
    if not cids:
        raise D.DataError(f"{path}: no candidates (the file has no JSON lines)")
    return np.array(cids, np.int64), np.array(rids, np.int64), feats


class CandidateDataset(torch.utils.data.Dataset):
    """Candidate rows in chunks: each item is a ready batch of item inputs (prefix cand_)."""

    def __init__(self, rows, table, chunk):
        self.rows, self.table, self.chunk = rows, table, chunk

    def __len__(self):
        return (len(self.rows) + self.chunk - 1) // self.chunk

    def __getitem__(self, i):
        return self.table.gather(self.rows[i * self.chunk:(i + 1) * self.chunk], "cand_")
