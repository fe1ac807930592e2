"""training.py helpers: keep_freed_memory's effect on the page faults of large temporaries."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a fresh process allocates and frees a 256 MiB tensor, then two somewhat smaller ones (as the
# loss's temporaries vary with the batch), and counts the minor page faults of touching those
# (the first touch of a fresh page is one fault)
PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
import torch, training
applied = training.keep_freed_memory() if sys.argv[1] == "1" else False
n = 64 * 2**20
torch.empty(n).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for m in (n - 2**20, n - 3 * 2**20):
    torch.empty(m).fill_(2.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, 2 * n * 4 // 4096)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reuses_pages_of_large_temporaries():
    out = {}
    for on in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), on], capture_output=True, text=True,
                           check=True)
        applied, faults, pages = r.stdout.split()
        out[on] = (applied, int(faults), int(pages))
    assert out["1"][0] == "True" and out["0"][0] == "False"
    assert out["0"][1] > out["0"][2] // 2          # glibc's default: a fresh mapping, every page faults
    assert out["1"][1] < out["1"][2] // 20         # kept: the freed block is reused in place


@pytest.mark.parametrize("min_gain", [0.0, 0.01, 0.05])
def test_patience_counts_only_gains_above_min_gain(monkeypatch, min_gain):
    """main.validate against a naive reading of the rule over a scripted NDCG@10 curve: the best
    checkpoint follows every new maximum; the patience count resets only on a gain of more than
    min_gain over the last counted gain (min_gain 0: every new maximum, the old rule)."""
    import types

    import config
    import main
    import training
    import validation

    curve = [0.10, 0.15, 0.152, 0.149, 0.1535, 0.16, 0.161, 0.158, 0.1625, 0.17, 0.1701]
    it = iter(curve)

    def scripted(*a, **k):
        m = {"NDCG@10": next(it)}
        return {"plain": m, "masked": {"NDCG@10": -1.0}}
    monkeypatch.setattr(validation, "holdout_metrics", scripted)
    cfg = config.from_args(main.get_args(["--min_gain", str(min_gain)]))
    s = types.SimpleNamespace(holdout=object(), model=None, table=None, device=None, cfg=cfg, trained=None,
                              holdout_cache=None)
    log = types.SimpleNamespace(record=lambda *a, **k: None)
    st = training.TrainState()
    best, ref, bad = None, None, 0
    for step, v in enumerate(curve, 1):
        st.step = step
        main.validate(s, st, log)
        if best is None or v > best[1]:
            best = [step, v]
        if ref is None or v > ref * (1 + min_gain):
            ref, bad = v, 0
        else:
            bad += 1
        assert st.best[:2] == best and st.bad_evals == bad, (step, min_gain)
    assert st.best[0] == len(curve)                  # 0.1701 is the best checkpoint under every rule
    if min_gain == 0.05:                             # counted: 0.10, 0.15, 0.16 (> 0.1575), 0.17 (> 0.168)
        assert st.ref == 0.17 and st.bad_evals == 1


def test_a_checkpoint_from_before_min_gain_resumes_against_its_best(monkeypatch):
    """TrainState without `ref` (older checkpoints): the best so far is the reference."""
    import types

    import config
    import main
    import training
    import validation

    monkeypatch.setattr(validation, "holdout_metrics", lambda *a, **k: {"plain": {"NDCG@10": 0.201},
                                                                      "masked": {"NDCG@10": 0.0}})
    cfg = config.from_args(main.get_args(["--min_gain", "0.01"]))
    s = types.SimpleNamespace(holdout=object(), model=None, table=None, device=None, cfg=cfg, trained=None,
                              holdout_cache=None)
    st = training.TrainState()
    st.restore({"step": 50, "best": [40, 0.2, False], "bad_evals": 1})
    st.step = 60
    main.validate(s, st, types.SimpleNamespace(record=lambda *a, **k: None))
    assert st.best[:2] == [60, 0.201] and st.bad_evals == 2 and st.ref == 0.2
