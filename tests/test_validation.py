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


def test_neighbor_vectors_against_a_naive_loop():
    """Each cold candidate with content: the mean of its k nearest warm candidates' first `width`
    coordinates by content cosine, at unit length (unit) or at the neighbours' mean length, its own
    last coordinate kept; cold ones without content and every warm one unchanged."""
    rng = np.random.default_rng(0)
    n, width, k = 12, 4, 3
    cand = rng.normal(size=(n, width + 1)).astype(np.float32)
    content = rng.normal(size=(n, 6)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    cold = np.zeros(n, bool)
    cold[[1, 4, 7, 9]] = True
    has = np.ones(n, bool)
    has[[7, 10]] = False                                  # a cold and a warm item without vectors
    for unit in (True, False):
        got, changed = V.neighbor_vectors(cand, cold, content, has, k, width, unit)
        assert changed == 3
        want = cand.copy()
        for i in range(n):
            if not (cold[i] and has[i]):
                continue
            sims = sorted(((float(content[i] @ content[j]), j) for j in range(n) if not cold[j] and has[j]),
                          reverse=True)[:k]
            m = np.mean([cand[j, :width] for _, j in sims], 0)
            length = 1.0 if unit else np.mean([np.linalg.norm(cand[j, :width]) for _, j in sims])
            want[i, :width] = m / np.linalg.norm(m) * length
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    same, changed = V.neighbor_vectors(cand, cold, content, has, 0, width, True)
    assert changed == 0 and same is cand


def test_cold_rows_and_table_content():
    model, table, _ = tiny()
    assert not V.cold_rows(model, np.array([1, 2, 6])).any()            # no record: nothing is cold
    cfg = M.ModelConfig(hidden_units=8, num_heads=1, dqk=4, dv=4, feat_dim=4, cold_neighbors=2, cold_ids="keep")
    m2 = M.GenerativeRecommender(cfg, model.data)
    trained = torch.ones(7, dtype=torch.bool)
    trained[3] = False
    m2.set_trained_items(trained)
    assert V.cold_rows(m2, np.array([1, 3, 6, 7, 9])).tolist() == [False, True, False, True, True]
    vec, has = table.content(np.array([1, 2]))                          # a table without vectors
    assert vec.shape == (2, 0) and not has.any()
