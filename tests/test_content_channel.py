"""The content channel (--content_channel K): scores against a naive cosine-plus-dot computation,
the channel the same for an item with and without an id, the training loss reaching it, and a
tiny train -> infer run that rebuilds it from the checkpoint."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import model as M  # noqa: E402
import objectives as O  # noqa: E402
from test_cold import sh, tiny_world  # noqa: E402
from test_model import make_batch, make_cfg, pack, training_batch  # noqa: E402


def channel_model(k=3, **kw):
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(content_channel=k, **kw))
    with torch.no_grad():
        m.content_query.weight.normal_()          # it starts at zero; a trained one is not
    return m.eval()


def candidates(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"cand_id": torch.tensor([3, 7, -1, 12, -1, 40])[:n], "cand_sparse": torch.randint(0, 6, (n, 2), generator=g),
            "cand_array": torch.randint(0, 5, (n, 1, 3), generator=g), "cand_mm_81": torch.randn(n, 4, generator=g),
            "cand_mm_mask": torch.tensor([[True], [False], [True], [True], [True], [True]])[:n],
            "cand_ctr": torch.randn(n, generator=g)}


def test_scores_are_the_cosine_plus_the_content_dot_product():
    """q . c of the exported vectors against a naive computation from the model's parts: cosine of
    the query head and the item tower, plus (W_q h) . (W_i mm), an item without a vector adding 0."""
    m = channel_model()
    b = make_batch()
    cand = candidates()
    with torch.no_grad():
        q, c = m.user_vectors(pack(b)), m.item_vectors(cand)
        assert q.shape == (3, 16 + 3) and c.shape == (6, 16 + 3)
        h = m.encode(pack(b))[:, -1]                                     # no action_cond: the state is h
        head = m.head(h)
        tower = m.embed_items(cand, "cand_")
        for u in range(3):
            for j in range(6):
                mm = cand["cand_mm_81"][j] * float(cand["cand_mm_mask"][j, 0])
                want = (F.cosine_similarity(head[u], tower[j], dim=0)
                        + (m.content_query.weight @ h[u]) @ (m.content_item.weight @ mm))
                assert abs(float(q[u] @ c[j]) - float(want)) < 1e-4, (u, j)
        assert torch.equal(c[1, 16:], torch.zeros(3))                     # no vector: no content score


def test_the_channel_ignores_the_id():
    """A cold candidate (no id row) and a trained one with the same vector get the same content
    coordinates: what the channel learned on trained items applies to cold ones unchanged."""
    m = channel_model(cold_ids="keep")
    cand = candidates()
    cand["cand_mm_81"][2] = cand["cand_mm_81"][0]
    with torch.no_grad():
        c = m.item_vectors(cand)
        assert torch.equal(c[0, 16:], c[2, 16:])
        assert not torch.equal(c[0, :16], c[2, :16])                      # the towers differ by the id row


def test_training_loss_reaches_the_channel():
    """One training step's loss has a gradient on the channel's query side (zero at the start, so
    the item side's gradient is zero then) and the scored target includes the content term."""
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(content_channel=3))
    trainer = O.Trainer(m, O.ObjectiveConfig(num_neg=7), torch.log(torch.rand(50) + 0.1), 50, 0.1)
    loss, _, last = trainer(training_batch(make_batch()))
    loss.backward()
    assert last.shape[-1] == 16 + 3
    assert m.content_query.weight.grad.abs().sum() > 0
    assert m.content_item.weight.grad.abs().sum() == 0


def test_train_and_infer_with_the_content_channel(tmp_path):
    """main.py --content_channel on a tiny demo world, then infer.py without the flag: the channel
    travels in the checkpoint and the exported vectors carry its coordinates."""
    world, cache, run, paths = tiny_world(tmp_path)
    sh("main.py", "--content_channel", 8, "--num_epochs", 2, "--hidden_units", 16, "--num_workers", 0, **paths)
    sh("infer.py", **paths)
    ck = torch.load(next((run / "ckpt").glob("global_step*/model.pt")), weights_only=True, map_location="cpu")
    assert ck["model"]["content_item.weight"].shape == (8, 32)
    assert ck["model"]["content_query.weight"].abs().sum() > 0                # trained away from zero
    for name in ("embedding.fbin", "query.fbin"):
        assert np.fromfile(run / "res" / name, dtype=np.int32, count=2)[1] == 16 + 8
    result = json.loads((run / "res" / "result.json").read_text())
    assert len(result["top10s"]) == 60 and all(len(t) == 10 for t in result["top10s"])
