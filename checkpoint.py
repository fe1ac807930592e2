"""Checkpoints, for training, inference and benchmarks alike: save, find (newest complete, best
by validation), load for resume, load for inference, and configs that survive code changes.

A checkpoint is TRAIN_CKPT_PATH/global_step{N}/model.pt (weights, the model, data and objective
configs, optimizer, scheduler, every RNG and the loop position), written to a temporary name and
renamed; meta.json beside it is written last and marks the folder complete. best.json in the
root names the step with the best validation NDCG@10. Checkpoints load with weights_only=True:
no code runs on load.

Configs carry CONFIG_VERSION. A config class may name, as class variables, the fields added since
checkpoints were first written (LEGACY: field -> the value that reproduces the behaviour from
before the field existed), renamed fields (RENAMED: old -> new), removed ones (REMOVED: field ->
the only value the code still implements) and fields that moved to another config (MOVED: kept
there, dropped here), so a checkpoint written before a change still loads.
"""
import dataclasses
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from layout import DataConfig, DataError, atomic_write, dump_json, read_json, sweep_temp
from model import GenerativeRecommender, ModelConfig
from objectives import ObjectiveConfig

# 1: configs without a version (model and data configs; the objective settings only in "args").
# 2: objective_config and config_version saved.
# 3: the data's sizes and switches in data_config only (no copy in model_config); loop_config saved.
CONFIG_VERSION = 3


# ---------------------------------------------------------------------------------------------
# Configs across versions
# ---------------------------------------------------------------------------------------------

def config_from_dict(cls, saved: dict, where: str):
    """An instance of the config dataclass `cls` from a saved dict, written by this version of the
    code or an earlier one: renamed fields take their new names, fields added since get their
    LEGACY value (else the default), removed fields must hold the value the code still
    implements. A field this code does not know (a newer checkpoint) is refused."""
    renamed, removed, legacy = (getattr(cls, n, {}) for n in ("RENAMED", "REMOVED", "LEGACY"))
    moved = getattr(cls, "MOVED", ())
    if not isinstance(saved, dict):
        raise DataError(f"{where}: {cls.__name__} is a {type(saved).__name__}, expected a dict of settings")
    d = {}
    for k, v in saved.items():
        if k in moved:
            continue
        if k in removed:
            if v != removed[k]:
                raise DataError(f"{where}: {cls.__name__}.{k} = {v!r}, which this version no longer implements "
                                f"(only {removed[k]!r}); use the code the checkpoint was trained with")
            continue
        d[renamed.get(k, k)] = v
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise DataError(f"{where}: {cls.__name__} has settings this version does not know ({', '.join(unknown[:5])}); "
                        f"expected a checkpoint written by this version of the code or an earlier one")
    for k in names - set(d):
        if k in legacy:
            d[k] = legacy[k]
    try:
        return cls(**d)
    except TypeError as e:
        raise DataError(f"{where}: {cls.__name__} cannot be rebuilt ({e})") from None


def saved_configs(state: dict, where: str) -> tuple:
    """(ModelConfig, DataConfig, ObjectiveConfig) of a loaded checkpoint, migrated to this
    version. A checkpoint from before objective configs takes its objective from the saved flags."""
    version = state.get("config_version", 1)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise DataError(f"{where}: config version {version!r} is newer than this code's ({CONFIG_VERSION}); "
                        f"update the code")
    for key in ("model_config", "data_config"):
        if key not in state:
            raise DataError(f"{where}: no {key}, not a checkpoint of this project")
    model_cfg = config_from_dict(ModelConfig, state["model_config"], where)
    data_cfg = config_from_dict(DataConfig, state["data_config"], where)
    obj = state.get("objective_config")
    if obj is None:
        names = {f.name for f in dataclasses.fields(ObjectiveConfig)}
        obj = {k: v for k, v in (state.get("args") or {}).items() if k in names}
    return model_cfg, data_cfg, config_from_dict(ObjectiveConfig, obj, where)


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------

def step_of(folder: str) -> int:
    return int(folder.rsplit("global_step", 1)[1])


def step_folders(root: str) -> list:
    """Every global_step{N} folder of `root`, complete or not. The folder's name is data, never a
    pattern: listed, not globbed (a TRAIN_CKPT_PATH such as ck[1] would glob to nothing)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [os.path.join(root, n) for n in names
            if n.startswith("global_step") and n[len("global_step"):].isdigit() and os.path.isdir(os.path.join(root, n))]


def sweep(root: str, say=print) -> None:
    """Remove what killed saves left in `root` (the run owns it: main.py holds its lock): atomic
    temporary files there and in its global_step folders, and step folders that then hold
    nothing (a save killed before its meta.json). A complete folder's files are never touched."""
    n, size = sweep_temp(root, lambda name: True)
    for d in step_folders(root):
        if os.path.exists(os.path.join(d, "meta.json")):
            continue
        k, b = sweep_temp(d, lambda name: True)
        n, size = n + k, size + b
        if not os.listdir(d):
            os.rmdir(d)
    if n:
        say(f"notice: {root}: removed {n} temporary file(s) ({size / 2**20:.1f} MiB) left by an interrupted save")


def complete(root: str, run: str = None) -> list:
    """global_step folders of `root` whose meta.json exists (of one run when `run` is given), by step."""
    done = [p for p in step_folders(root) if os.path.exists(os.path.join(p, "meta.json"))]
    if run is not None:
        done = [p for p in done if meta_of(p).get("run") == run]
    return sorted(done, key=step_of)


def meta_of(folder: str) -> dict:
    """A checkpoint folder's meta.json ({} when unreadable: such a folder is not this run's)."""
    try:
        meta = read_json(os.path.join(folder, "meta.json"))
    except DataError:
        return {}
    return meta if isinstance(meta, dict) else {}


def newest(root: str):
    """The most recently written complete checkpoint folder of `root` (by meta.json's time, so a
    later run beats an earlier one's higher step numbers), or None."""
    done = complete(root)
    return max(done, key=lambda p: (os.path.getmtime(os.path.join(p, "meta.json")), step_of(p))) if done else None


def runs_in(root: str) -> set:
    """The run ids of the complete checkpoints in `root` ("unknown" for checkpoints without one)."""
    return {meta_of(p).get("run", "unknown") for p in complete(root)}


def best(root: str):
    """(folder, record) of best.json's pick when that folder is complete, else (None, None)."""
    path = os.path.join(root, "best.json")
    if not os.path.exists(path):
        return None, None
    rec = read_json(path)
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
        raise DataError(f"{path}: expected an object with \"path\" (a global_step folder), \"global_step\" and "
                        f"\"valid_NDCG@10\"; delete it to use the newest checkpoint")
    folder = os.path.join(root, rec["path"])
    return (folder, rec) if os.path.exists(os.path.join(folder, "meta.json")) else (None, None)


def find_for_inference(path: str) -> tuple:
    """(model.pt path, why it was chosen) for a model.pt, a global_step folder, or a root of
    them: best.json's pick, else the newest complete one."""
    if os.path.isfile(path):
        return path, "the file given"
    if os.path.isfile(os.path.join(path, "model.pt")):
        return os.path.join(path, "model.pt"), "the folder given"
    folder, rec = best(path)
    if folder is not None:
        score = rec.get("valid_NDCG@10")
        how = f", valid NDCG@10 {score:.4f}" if isinstance(score, (int, float)) else ""
        return os.path.join(folder, "model.pt"), f"best by validation (best.json{how})"
    folder = newest(path)
    if folder is None:
        raise DataError(f"{path}: no checkpoint (looked for model.pt or global_step*/meta.json)")
    runs = runs_in(path)
    why = "newest complete checkpoint (no best.json)"
    if len(runs) > 1:
        why += f"; the folder holds {len(runs)} runs, this is run {meta_of(folder).get('run', 'unknown')}'s"
    return os.path.join(folder, "model.pt"), why


def find_resume(mode: str, root: str):
    """--resume auto: the newest complete checkpoint under TRAIN_CKPT_PATH (None if there is
    none); none: start afresh; else a checkpoint folder or file."""
    if mode == "none":
        return None
    if mode != "auto":
        return mode
    return newest(root)


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------

def save(root: str, model, configs: dict, settings: dict, opt, sched, st: dict, extra: dict, keep_last: int,
         world: int):
    """global_step{N}/model.pt written atomically, then meta.json last: only a folder with
    meta.json counts. Holds everything an exact resume needs. configs: {"model": ModelConfig,
    "data": DataConfig, "objective": ObjectiveConfig, "loop": LoopConfig}; settings: the run's
    resolved flags (config.settings), saved as "args"; st: the TrainState as a dict. Keeps the
    newest `keep_last` folders plus the best by validation. Returns the folder (None on ranks
    other than 0)."""
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    d = os.path.join(root, f"global_step{st['step']}")
    state = {"model": model.state_dict(), **{f"{k}_config": c.to_dict() for k, c in configs.items()},
             "config_version": CONFIG_VERSION, "args": dict(settings), "global_step": st["step"], **st,
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs, **extra}
    with atomic_write(os.path.join(d, "model.pt"), "wb") as f:
        torch.save(state, f)
    dump_json({"global_step": st["step"], "epoch": st["epoch"], "micro": st["micro"], "run": st.get("run"),
               **{k: v for k, v in extra.items() if isinstance(v, (int, float, str))}}, os.path.join(d, "meta.json"))
    if st["best"] is not None:
        dump_json({"global_step": st["best"][0], "valid_NDCG@10": st["best"][1], "path": f"global_step{st['best'][0]}",
                   "run": st.get("run"), **({"mask_history": st["best"][2]} if len(st["best"]) > 2 else {})},
                  os.path.join(root, "best.json"))
    if keep_last > 0:
        # only this run's own checkpoints rotate: another run's are never deleted
        keep = {f"global_step{st['best'][0]}"} if st["best"] is not None else set()
        for old in complete(root, st.get("run"))[:-keep_last]:
            if os.path.basename(old) not in keep:
                shutil.rmtree(old, ignore_errors=True)
    return d


def mark_done(folder: str, why: str) -> None:
    """Record in a checkpoint's meta.json that its run ended there (`why`): resuming it has
    nothing left to do."""
    meta = meta_of(folder)
    if meta:
        dump_json({**meta, "done": why}, os.path.join(folder, "meta.json"))


def load_state(path: str, purpose: str = "load") -> dict:
    """torch.load with weights_only=True; any failure is one DataError line naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # zip, pickle and torch errors alike; torch's advice to unpickle unsafely is dropped
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = type(e).__name__ if "weights_only" in str(e) or not first else first[:120]
        raise DataError(f"{path}: cannot {purpose} this checkpoint, not a checkpoint of this project ({why})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise DataError(f"{path}: cannot {purpose} this checkpoint, not a checkpoint of this project (no weights)")
    return state


def settings_diff(ck: dict, where: str, model_cfg: ModelConfig, data_cfg: DataConfig) -> str:
    """The model and data settings (first five, with this run's value and the checkpoint's) in
    which a loaded checkpoint differs from the run's; "" when none does."""
    saved_model, saved_data, _ = saved_configs(ck, where)
    if (saved_model, saved_data) == (model_cfg, data_cfg):
        return ""
    diff = sorted((k, v, saved.to_dict()[k]) for mine, saved in ((model_cfg, saved_model), (data_cfg, saved_data))
                  for k, v in mine.to_dict().items() if saved.to_dict()[k] != v)
    return ", ".join(f"{k} {v!r} here, {old!r} there" if len(repr(v)) + len(repr(old)) < 60 else k
                     for k, v, old in diff[:5])


def load_resume(path: str, model, opt, sched, model_cfg: ModelConfig, data_cfg: DataConfig, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNGs; returns the saved state. Refuses
    a checkpoint whose model or data config (migrated to this version) differs from the run's."""
    f = path if os.path.isfile(path) else os.path.join(path, "model.pt")
    ck = load_state(f, "resume from")
    diff = settings_diff(ck, f, model_cfg, data_cfg)
    if diff:
        raise DataError(f"{f}: checkpoint was trained with other settings ({diff}); "
                        f"use another TRAIN_CKPT_PATH for a run with these flags")
    if "optimizer" not in ck:
        raise DataError(f"{f}: holds weights only, no training state to resume from")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    rngs = ck["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return ck


def load_for_inference(path: str) -> tuple:
    """(model in eval mode on the CPU, DataConfig, model.pt path, info) for a checkpoint file,
    folder or root (see find_for_inference); the model is rebuilt from the checkpoint's own
    configs, so no training flag is repeated. info: "why" that checkpoint, and "mask_history",
    whether validation preferred masking each user's history (None when it did not say)."""
    f, why = find_for_inference(path)
    state = load_state(f)
    model_cfg, data_cfg, _ = saved_configs(state, f)
    model = GenerativeRecommender(model_cfg, data_cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise DataError(f"{f}: weights do not match the model config ({detail[:160]})") from None
    return model.eval(), data_cfg, f, {"why": why, "mask_history": state.get("valid_mask_history")}
