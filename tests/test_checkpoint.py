"""The module seams and the checkpoint module: torch-free side jobs, no import cycle, configs that
load across code versions, and which checkpoint inference picks."""
import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint as C  # noqa: E402
from layout import DataError  # noqa: E402
from model import GenerativeRecommender, ModelConfig  # noqa: E402
from dataset import DataConfig  # noqa: E402


def test_side_jobs_import_no_torch():
    code = ("import sys; import evaluate, convert_public, precompute_ctr, make_demo_data, layout; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_cycle_between_project_modules():
    """Depth-first search over the top-level modules' imports (module level and inside functions)."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[name] = sorted(d for d in deps if d in mods and d != name)
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in graph[n]:
            assert state.get(d) != "open", "import cycle: " + " -> ".join(stack + [n, d])
            if d not in state:
                visit(d, stack + [n])
        state[n] = "done"
    for n in graph:
        if n not in state:
            visit(n, [])
    # the promised directions: readers never build modules, retrieval sees vectors only,
    # inference never imports the training loop, the model knows no files
    for low, forbidden in [("layout", {"dataset", "model", "main", "training", "infer", "torch"}), ("retrieval_torch", {"model", "dataset", "main"}),
                           ("infer", {"main", "training"}), ("model", {"dataset", "dataset_packed", "main", "training", "infer"}),
                           ("dataset", {"model", "main", "training", "infer"}), ("evaluate", {"dataset", "model", "main"})]:
        assert not forbidden & set(graph[low]), (low, graph[low])


@dataclasses.dataclass(frozen=True)
class Toy:
    width: int = 8
    gate: str = "on"           # added later: checkpoints from before behave as "off"
    depth: int = 2             # was "layers"
    LEGACY: ClassVar[dict] = {"gate": "off"}
    RENAMED: ClassVar[dict] = {"layers": "depth"}
    REMOVED: ClassVar[dict] = {"old_norm": "rms"}


def test_config_from_dict_across_versions():
    assert C.config_from_dict(Toy, {"width": 4, "gate": "on", "depth": 3}, "f") == Toy(4, "on", 3)
    # written before `gate` existed, with the old name of `depth` and a removed field at its only value
    assert C.config_from_dict(Toy, {"width": 4, "layers": 5, "old_norm": "rms"}, "f") == Toy(4, "off", 5)
    # a field without a LEGACY entry takes its default
    assert C.config_from_dict(Toy, {"gate": "on"}, "f") == Toy(8, "on", 2)
    with pytest.raises(DataError, match=r"^f: Toy.old_norm = 'layer', which this version no longer implements"):
        C.config_from_dict(Toy, {"old_norm": "layer"}, "f")
    with pytest.raises(DataError, match=r"^f: Toy has settings this version does not know \(zzz\)"):
        C.config_from_dict(Toy, {"zzz": 1}, "f")
    with pytest.raises(DataError, match="^f: Toy is a list"):
        C.config_from_dict(Toy, [1], "f")


def tiny_model():
    cfg = ModelConfig(hidden_units=8, feat_dim=4, num_blocks=1, num_heads=2, dqk=4, dv=4)
    data = DataConfig(maxlen=5, use_timefeat=False, num_users=3, num_items=7)
    torch.manual_seed(0)
    return GenerativeRecommender(cfg, data), data


def write(root, step, model, data_cfg, model_cfg_dict=None, extra=None, meta=True):
    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    state = {"model": model.state_dict(), "model_config": model_cfg_dict or model.cfg.to_dict(),
             "data_config": data_cfg.to_dict(), **(extra or {})}
    torch.save(state, d / "model.pt")
    if meta:
        (d / "meta.json").write_text("{}")
    return d


def test_checkpoint_with_the_data_fields_in_its_model_config_loads(tmp_path):
    """Config version 2 kept a copy of the data's sizes and switches in model_config: they are
    dropped on load (DataConfig holds them) and the weights load unchanged."""
    model, data_cfg = tiny_model()
    old = {**model.cfg.to_dict(), **{k: getattr(data_cfg, k) for k in ModelConfig.MOVED}}
    write(tmp_path, 2, model, data_cfg, old, extra={"config_version": 2})
    got, dcfg, _, _ = C.load_for_inference(str(tmp_path))
    assert got.cfg == model.cfg and dcfg == data_cfg and got.data == data_cfg
    for k, v in model.state_dict().items():
        assert torch.equal(got.state_dict()[k], v)


def test_checkpoint_from_before_a_new_field_loads(tmp_path, monkeypatch):
    model, data_cfg = tiny_model()
    old = model.cfg.to_dict()
    del old["use_user_id"], old["emb_init_std"]     # as if written before these fields existed
    write(tmp_path, 3, model, data_cfg, old)        # no config_version, no objective_config: version 1
    monkeypatch.setattr(ModelConfig, "LEGACY", {"emb_init_std": 0.5})
    got, dcfg, path, info = C.load_for_inference(str(tmp_path))
    assert got.cfg.emb_init_std == 0.5 and got.cfg.use_user_id is True and dcfg == data_cfg
    assert path.endswith("global_step3/model.pt") and info == {"why": "newest complete checkpoint (no best.json)",
                                                                "mask_history": None}
    for k, v in model.state_dict().items():
        assert torch.equal(got.state_dict()[k], v)


def test_inference_picks_best_then_newest_complete(tmp_path):
    model, data_cfg = tiny_model()
    for step in (2, 5):
        write(tmp_path, step, model, data_cfg)
    write(tmp_path, 9, model, data_cfg, meta=False)                  # incomplete: never chosen
    assert C.find_for_inference(str(tmp_path))[0].endswith("global_step5/model.pt")
    (tmp_path / "best.json").write_text(json.dumps({"path": "global_step2", "global_step": 2, "valid_NDCG@10": 0.25}))
    path, why = C.find_for_inference(str(tmp_path))
    assert path.endswith("global_step2/model.pt") and why == "best by validation (best.json, valid NDCG@10 0.2500)"
    (tmp_path / "best.json").write_text(json.dumps({"global_step": 2}))
    with pytest.raises(DataError, match=r"best.json: expected an object with \"path\""):
        C.find_for_inference(str(tmp_path))


def test_newer_config_version_is_refused(tmp_path):
    model, data_cfg = tiny_model()
    write(tmp_path, 1, model, data_cfg, extra={"config_version": C.CONFIG_VERSION + 1})
    with pytest.raises(DataError, match="newer than this code"):
        C.load_for_inference(str(tmp_path))


@pytest.mark.parametrize("payload", [b"", b"\x00\x01garbage" * 10, b"PK\x03\x04broken zip"])
def test_unreadable_checkpoint_is_one_line(tmp_path, payload):
    f = tmp_path / "model.pt"
    f.write_bytes(payload)
    with pytest.raises(DataError) as e:
        C.load_for_inference(str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f}: cannot load this checkpoint") and "\n" not in msg and "weights_only" not in msg


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    f = tmp_path / "model.pt"
    torch.save({"model": Evil()}, f)
    with pytest.raises(DataError) as e:
        C.load_for_inference(str(f))
    assert not (tmp_path / "pwned").exists() and "weights_only" not in str(e.value)
