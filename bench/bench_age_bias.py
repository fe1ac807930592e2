"""The item-age pair bias at a training step's size: forward and backward of model.pair_bias as
it is (one table row per distinct request day, rows copied to the requests) beside the per-pair
form it replaced (one table index computed and gathered for every request-candidate pair; its
backward scatters every pair's gradient into the small table), in the same process, and the
current form with --item_recent's recent-activity rows added.

    python bench/bench_age_bias.py [--requests 5000] [--candidates 2560] [--days 30] [--repeats 15]

Shape: the demo's step (128 users of ~40 targets each against 2,048 in-batch and 512 sampled
candidates; requests spread over --days calendar days). Both forms give the same values (checked
here before timing). Times are medians of --repeats, interleaved; the ratio is what to read on
a shared machine.
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import benchlib as B  # noqa: E402
import layout as L  # noqa: E402
import model as M  # noqa: E402

DAY = 86400


def per_pair(model, ids, ts):
    """The replaced form: a table index for every (request, candidate) pair."""
    table, day_n, day_m, span = model.age_days(ids, ts)
    return table[day_n.unsqueeze(1) - day_m + span]


def main(argv=None):
    p = L.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000, help="targets in a step (rows of the bias)")
    p.add_argument("--candidates", type=int, default=2560, help="candidates each target is scored against")
    p.add_argument("--items", type=int, default=2500, help="catalogue size")
    p.add_argument("--days", type=int, default=30, help="calendar days the requests and first events span")
    p.add_argument("--repeats", type=int, default=15, help="timed forward+backward passes per form")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # age_unseen "mask": the bias is then the age rows alone, what per_pair computes
    cfg = M.ModelConfig(hidden_units=8, num_heads=1, dqk=8, dv=8, feat_dim=8, item_age=True, age_unseen="mask")
    model = M.GenerativeRecommender(cfg, M.DataConfig(maxlen=4, num_users=2, num_items=a.items))
    t0 = 1_700_000_000
    first = torch.randint(t0, t0 + a.days * DAY, (a.items + 1,))
    first[0] = -1
    model.set_first_seen(first, t0 + a.days * DAY)
    with torch.no_grad():
        model.age_bias.copy_(torch.randn(M.AGE_BUCKETS))
    ts = torch.randint(t0, t0 + a.days * DAY, (a.requests,))
    ids = torch.randint(1, a.items + 1, (a.candidates,))
    assert torch.equal(per_pair(model, ids, ts), model.pair_bias(ids, ts))
    # the same with --item_recent: its rows join the age rows before the copy to the requests
    recent = M.GenerativeRecommender(dataclasses.replace(cfg, item_recent=True), model.data)
    recent.load_state_dict(model.state_dict(), strict=False)
    recent.set_first_seen(first, t0 + a.days * DAY)
    recent.set_recent(torch.randint(0, M.RECENT_BUCKETS, (a.items + 1, a.days + 1), dtype=torch.uint8),
                      t0 // DAY, t0 + a.days * DAY)
    forms = {"per-pair gather (before)": lambda: per_pair(model, ids, ts),
             "row per request day (now)": lambda: model.pair_bias(ids, ts),
             "row per request day, + --item_recent": lambda: recent.pair_bias(ids, ts)}
    times = {k: [] for k in forms}
    for _ in range(a.repeats):
        for name, f in forms.items():
            model.age_bias.grad = recent.age_bias.grad = recent.recent_bias.grad = None
            t = time.perf_counter()
            f().sum().backward()
            times[name].append(time.perf_counter() - t)
    base = B.med(times["per-pair gather (before)"])
    rows = [[k, B.fmt(B.med(v) * 1000), B.fmt(base / B.med(v), 2) + "x"] for k, v in times.items()]
    body = (f"Item-age pair bias, forward + backward, [{a.requests} requests x {a.candidates} candidates] over "
            f"{a.days} days, median of {a.repeats} interleaved passes:\n\n"
            + B.table_md(["form", "ms", "speed-up"], rows)
            + "\n\n" + B.load_line())
    print(body)
    if not a.no_record:
        B.append_benchmarks("Item-age pair bias (bench/bench_age_bias.py)", body)


if __name__ == "__main__":
    L.run_cli(main)
