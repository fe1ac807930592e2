"""Packing and sampling for training and inference: the packed collate (every item input of a
batch gathered once, in the DataLoader worker), shared negatives, the epoch sampler with
length bucketing, and the inference datasets (predict users and candidate items).

The inference datasets reuse the training feature code (dataset.SequenceBuilder,
dataset.ItemTable), so a user's tokens and an item's inputs are built exactly as in training.
Cold cases of the contract are mapped, never dropped: raw-string user ids and unseen feature
values become 0 (unknown); candidates unknown to the indexer are appended to the item table with
the features the predict set gives, and a history item with a raw creative id gets that row when
it is also a candidate (else the unknown row).
"""
import math
import os
import random
import sys

import numpy as np
import torch

from layout import (CLICK, MAX_ID, DataError, LineReader, check_feats, iter_jsonl, parse_user_records, read_offsets,
                    show_json, with_location, worker_signals)


# ---------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------

class PackedCollate:
    """Stacks samples and gathers all item inputs (history, targets, sampled negatives) into one
    dict of tensors inside the DataLoader worker, so the training step only moves tensors.

    Item inputs are gathered once per distinct item (`seq_inv` / `pos_inv` map tokens to them):
    a batch repeats items a lot, and the item tower then runs once per distinct item. Targets
    are distinct per (item, clicked), because the target's item CTR leaves out its own event.
    """

    PER_USER = ("user_id", "user_sparse", "user_array")    # every other array is per token [T, ...]

    def __init__(self, table, trim: bool = True):
        self.table, self.trim = table, trim

    def __call__(self, samples: list) -> dict:
        keys = [k for k in samples[0] if not k.startswith("_")]
        lo = 0
        if self.trim:
            # Left padding that every sample of the batch shares is dropped: outputs do not depend
            # on it (the encoder is left-padding invariant, a test checks it), and with batches of
            # similar lengths (EpochSampler's bucketing) it is most of the work on short sequences.
            lo = min(int(np.argmax(s["token_type"] > 0)) for s in samples)
        batch = {k: torch.from_numpy(np.stack([s[k] if k in self.PER_USER else s[k][lo:] for s in samples]))
                 for k in keys}
        batch.update({k: [s[k] for s in samples] for k in samples[0] if k.startswith("_")})
        # An event among its item's first new_item_events (seq_/pos_young) shows the item as new:
        # id -1, which the model embeds with its new-item row; so a young event is its own input.
        seq = batch.pop("seq_row").numpy()
        young = batch.pop("seq_young").numpy().astype(np.int64) if "seq_young" in batch else 0
        keys, inv = np.unique(seq * 2 + young, return_inverse=True)
        batch.update(self.table.gather(keys // 2, "seq_"))
        batch["seq_id"][torch.from_numpy(keys % 2 == 1)] = -1
        batch["seq_inv"] = torch.from_numpy(inv.reshape(seq.shape))
        if "pos_row" in batch:
            pos, click = batch["pos_row"].numpy(), (batch["pos_action"].numpy() >= CLICK).astype(np.int64)
            young = batch.pop("pos_young").numpy().astype(np.int64) if "pos_young" in batch else 0
            keys, inv = np.unique((pos * 2 + click) * 2 + young, return_inverse=True)
            rows = keys // 4
            batch.update(self.table.gather(rows, "pos_", ctr=self.table.loo_ctr(rows, (keys // 2) % 2)))
            batch["pos_id"][torch.from_numpy(keys % 2 == 1)] = -1
            batch["pos_inv"] = torch.from_numpy(inv.reshape(pos.shape))
        if "pkg_row" in batch:
            pkg = batch["pkg_row"].numpy()
            rows, inv = np.unique(pkg, return_inverse=True)
            batch.update(self.table.gather(rows, "pkg_"))
            batch["pkg_inv"] = torch.from_numpy(inv.reshape(pkg.shape))
        return batch


def sample_negatives(table, num_neg: int, num_items: int, generator=None) -> dict:
    """Uniform random negatives shared by a batch (prefix neg_); num_neg -1 = the whole catalogue.

    Drawn in the training process from a checkpointed RNG, so a resumed run draws the same."""
    rows = (np.arange(1, num_items + 1) if num_neg < 0 else
            torch.randint(1, num_items + 1, (num_neg,), generator=generator).numpy())
    out = table.gather(rows, "neg_")
    out["neg_row"] = torch.from_numpy(rows)
    return out


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and random follow torch's per-worker seed. Ctrl-C and
    SIGTERM are the training process's to handle (it saves a checkpoint and stops its workers): a
    worker ignores them, and dies with its parent (layout.worker_signals)."""
    worker_signals(keep_on_term=True)
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order fixed by (seed, epoch), sharded over ranks, resumable from a position.

    Each rank gets every world-th index of one permutation (padded by wrapping so all ranks have
    the same length, as DistributedSampler does). With `lengths` (bytes per line, a free proxy
    for the number of events), each run of `bucket` batches is sorted by length and the batches
    are shuffled again: a batch then holds sequences of similar length, and PackedCollate drops
    the padding they share."""

    def __init__(self, n: int, world: int, rank: int, seed: int, batch_size: int = 1, lengths: np.ndarray = None,
                 bucket: int = 64):
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.batch_size, self.lengths, self.bucket = batch_size, lengths, bucket
        self.epoch_len = math.ceil(n / world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        perm = torch.cat([perm, perm[:self.epoch_len * self.world - self.n]])[self.rank::self.world]
        if self.lengths is None:
            return perm
        batches, span = [], self.batch_size * self.bucket
        for i in range(0, len(perm), span):
            chunk = perm[i:i + span]
            batches += chunk[torch.from_numpy(np.argsort(self.lengths[chunk.numpy()], kind="stable"))].split(self.batch_size)
        # a short final batch stays last, so the DataLoader's batches are exactly these
        short = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()] + short
        return torch.cat(batches)

    def __iter__(self):
        return iter(self.order()[self.start:].tolist())

    def __len__(self):
        return self.epoch_len - self.start


# ---------------------------------------------------------------------------------------------
# Inference datasets
# ---------------------------------------------------------------------------------------------

def _need_file(path: str, what: str, where: str) -> None:
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, expected the {what} file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (looked for the {what} in {where})")


def eval_offsets(eval_dir: str, seq_name: str = "predict_seq") -> tuple:
    """Offsets of predict_seq.jsonl: the pickle when present, else computed by one pass."""
    seq = os.path.join(eval_dir, f"{seq_name}.jsonl")
    pkl = os.path.join(eval_dir, f"{seq_name}_offsets.pkl")
    _need_file(seq, "predict sequences", eval_dir)
    if os.path.exists(pkl):
        return seq, read_offsets(pkl, seq)
    offsets, pos = [], 0
    with open(seq, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return seq, offsets


class PredictSeqDataset(torch.utils.data.Dataset):
    """One sample per line of predict_seq.jsonl, in file order; `_user` is the raw user id.

    A user on several lines is answered once per line, in order (infer.py says how many
    repeat); a line without item events (only a profile record) is a cold user, answered from
    its features."""

    def __init__(self, eval_dir: str, builder, raw_user_of: dict):
        seq, offsets = eval_offsets(eval_dir)
        if not offsets:
            raise DataError(f"{seq}: no predict users (the file has no JSON lines)")
        self.lines, self.builder, self.raw_user_of = LineReader(seq, offsets), builder, raw_user_of

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        records, where = self.lines[i]
        user, user_feat, events = parse_user_records(records, where)
        s = with_location(where, self.builder.build, user, user_feat, events, False)
        s["_user"] = user if isinstance(user, str) else self.raw_user_of.get(user, str(user))
        s["_history"] = self.builder.item_rows([e[0] for e in events])
        s["_history_ts"] = np.array([e[3] for e in events], np.int64)
        return s


_told = set()     # (path, size, mtime) of candidate files whose duplicates were already reported


def read_candidates(eval_dir: str, known=()) -> tuple:
    """predict_set.jsonl -> (creative ids int64, retrieval ids int64, feature dicts).

    Every line is validated: creative_id and retrieval_id are ints in [0, 2^63 - 1] (the ids
    are stored as int64), retrieval ids are unique, no object gives a key twice.

    Duplicates: a creative id listed on several lines (under other retrieval ids) is kept once,
    with its first line's retrieval id and features; the later lines are dropped (their
    retrieval ids are then absent from id.u64bin) and counted in one notice on stderr, once per
    file per process. Kept, a duplicate would fill a user's top-k with the same item twice.

    The feature dict is kept only for creative ids not in `known` (cold items; the rest get
    None): the item table already holds the others' features, and at millions of candidates the
    dicts would dominate memory."""
    path = os.path.join(eval_dir, "predict_set.jsonl")
    _need_file(path, "candidate pool", eval_dir)
    cids, rids, feats, line_of, first_of = [], [], [], {}, {}
    dropped, first_dup = 0, None
    for lineno, obj in iter_jsonl(path, unique_keys=True):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or "creative_id" not in obj:
            raise DataError(f"{where}: expected an object with creative_id, retrieval_id, features")
        cid, rid = obj["creative_id"], obj.get("retrieval_id", len(line_of))
        for name, v in (("creative_id", cid), ("retrieval_id", rid)):
            if type(v) is not int or not 0 <= v <= MAX_ID:
                raise DataError(f"{where}: {name} is {show_json(v)}, expected a non-negative int below 2^63")
        if rid in line_of:      # id.u64bin and retrive_id2creative_id.json need one row per id
            raise DataError(f"{where}: retrieval_id {rid} already used on line {line_of[rid]}, "
                              f"expected unique retrieval ids")
        line_of[rid] = lineno
        f = obj.get("features")
        check_feats(f, where, "features")
        if cid in first_of:
            dropped += 1
            first_dup = first_dup or (lineno, cid, first_of[cid])
            continue
        first_of[cid] = lineno
        cids.append(cid)
        rids.append(rid)
        feats.append(None if cid in known else (f or {}))
    if not cids:
        raise DataError(f"{path}: no candidates (the file has no JSON lines)")
    if dropped:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if key not in _told:
            _told.add(key)
            line, cid, first = first_dup
            print(f"notice: {path}: {dropped} lines repeat a creative id already listed (first: line {line}, "
                  f"creative_id {cid} of line {first}); each creative id is kept once, with its first line's "
                  f"retrieval_id ({len(cids)} distinct candidates)", file=sys.stderr, flush=True)
    return np.array(cids, np.int64), np.array(rids, np.int64), feats


class HoldoutDataset(torch.utils.data.Dataset):
    """The validation slice held out of the training users (dataset.holdout_last_clicks): each
    sample is the user's history before the held-out click, built as at inference, with
    `_target` (the clicked item's row), `_ts` (its time) and `_history` (the history's item rows)."""

    def __init__(self, seq_path: str, offsets: list, cut: dict, builder):
        self.lines, self.cut, self.builder = LineReader(seq_path, offsets), cut, builder
        self.index = sorted(cut)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, j):
        i = self.index[j]
        records, where = self.lines[i]
        user, user_feat, events = parse_user_records(records, where)
        history, k = events[:self.cut[i]], self.cut[i]
        s = with_location(where, self.builder.build, user, user_feat, history, False)
        s["_history"] = self.builder.item_rows([e[0] for e in history])
        s["_target"] = int(with_location(where, self.builder.item_rows, [events[k][0]])[0])
        s["_ts"] = int(events[k][3])
        return s


class CandidateDataset(torch.utils.data.Dataset):
    """Candidate rows in chunks: each item is a ready batch of item inputs (prefix cand_)."""

    def __init__(self, rows: np.ndarray, table, chunk: int):
        self.rows, self.table, self.chunk = rows, table, chunk

    def __len__(self):
        return (len(self.rows) + self.chunk - 1) // self.chunk

    def __getitem__(self, i):
        return self.table.gather(self.rows[i * self.chunk:(i + 1) * self.chunk], "cand_")
