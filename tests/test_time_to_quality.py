"""bench/time_to_quality.py's log reading: validation lines paired with their epoch's time, and
the time to 95% of the best, against values worked out by hand."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import time_to_quality as T  # noqa: E402

LOG = """notice: something
step 10 valid HR@10 0.1000  NDCG@10 0.0500  Score 0.0600  cold_NDCG@10 0.9000
epoch 1 done  step 10  12s  -> ckpt/global_step10
step 20 valid HR@10 0.2000  NDCG@10 0.0960  Score 0.1000
epoch 2 done  step 20  25s  -> ckpt/global_step20
step 30 valid HR@10 0.2100  NDCG@10 0.1000  Score 0.1100
epoch 3 done  step 30  37s  -> ckpt/global_step30
step 40 valid HR@10 0.2000  NDCG@10 0.0990  Score 0.1050
epoch 4 done  step 40  50s  -> ckpt/global_step40
step 50 valid HR@10 0.2000  NDCG@10 0.2000  Score 0.1050
"""


def test_curve_pairs_each_validation_with_its_epoch_time():
    # the cold_ column is not the overall NDCG@10; the last validation has no epoch line: dropped
    assert T.curve(LOG) == [(10, 12.0, 0.05), (20, 25.0, 0.096), (30, 37.0, 0.1), (40, 50.0, 0.099)]


def test_summary_by_hand():
    s = T.summarise(T.curve(LOG))
    # best 0.1 at step 30 (37 s); 95% of it is 0.095: first reached at step 20 (25 s)
    assert (s["best"], s["best_step"], s["t_best"]) == (0.1, 30, 37.0)
    assert (s["step95"], s["t95"], s["total"], s["steps"]) == (20, 25.0, 50.0, 40)
