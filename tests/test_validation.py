"""Validation scoring: the held-out users' batch cache gives the same queries as reading them again."""
import numpy as np
import torch

import dataset as D
import model as M
import validation as V


class Samples(torch.utils.data.Dataset):
    """User samples built as the held-out ones are, counting how often one is read."""

    def __init__(self, builder, n=7):
        self.builder, self.n, self.reads = builder, n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        self.reads += 1
        events = [(1 + (j + e) % 6, None, 1 + e % 2, 1000 + 60 * e) for e in range(2 + j % 3)]
        s = self.builder.build(1, {"103": 1 + j % 2}, events, False)
        s["_target"] = 1 + j % 6
        s["_history"] = self.builder.item_rows([e[0] for e in events])
        return s


def tiny():
    cfg = D.DataConfig(maxlen=4, num_users=3, num_items=6, item_sparse={"100": 3}, user_sparse={"103": 3})
    idx = {"u": {"user_a": 1}, "i": {100 + r: r for r in range(1, 7)}, "f": {}}
    table = D.ItemTable(cfg, idx, {str(r): {"100": 1 + r % 2} for r in range(1, 7)})
    torch.manual_seed(0)
    model = M.GenerativeRecommender(M.ModelConfig(hidden_units=8, num_heads=1, dqk=4, dv=4, feat_dim=4), cfg).eval()
    return model, table, D.SequenceBuilder(cfg, table, idx["u"])


def test_cached_batches_give_the_same_queries_without_reading_again():
    model, table, builder = tiny()
    ds = Samples(builder)
    want_q, want_x = V.embed_users(model, ds, table, torch.device("cpu"), batch_size=3, keep=("_history", "_target"))
    cache = V.BatchCache()
    for n in range(3):
        reads = ds.reads
        q, x = V.embed_users(model, ds, table, torch.device("cpu"), batch_size=3, keep=("_history", "_target"),
                             cache=cache)
        np.testing.assert_array_equal(q, want_q)
        assert x["_target"] == want_x["_target"]
        assert [h.tolist() for h in x["_history"]] == [h.tolist() for h in want_x["_history"]]
        assert ds.reads - reads == (len(ds) if n == 0 else 0)     # read once, then from the cache
    assert cache.complete and len(cache.batches) == 3
    # the cache follows the model: new weights, new queries from the same batches
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    q2, _ = V.embed_users(model, ds, table, torch.device("cpu"), batch_size=3, keep=("_target",), cache=cache)
    q3, _ = V.embed_users(model, ds, table, torch.device("cpu"), batch_size=3, keep=("_target",))
    np.testing.assert_array_equal(q2, q3)
    assert not np.allclose(q2, want_q)


def test_a_cache_over_its_limit_keeps_nothing_and_reads_each_time():
    model, table, builder = tiny()
    ds = Samples(builder)
    want_q, _ = V.embed_users(model, ds, table, torch.device("cpu"), batch_size=3)
    cache = V.BatchCache(limit=1)
    for _ in range(2):
        reads = ds.reads
        q, _ = V.embed_users(model, ds, table, torch.device("cpu"), batch_size=3, cache=cache)
        np.testing.assert_array_equal(q, want_q)
        assert ds.reads - reads == len(ds) and not cache.complete and cache.batches == []
