"""From flags and config files to a run's frozen configs: the one path every setting takes.

    python main.py --config configs/s3rec.toml --seed 1      # a config file, flags override it
    python main.py --config seed --lr 0.002                  # a file in configs/ by name
    python main.py --config s3rec --print_config             # the resolved configuration, then exit

A config file is TOML (read with the standard library's tomllib) whose keys are main.py's flag
names without the dashes, at the top level or in tables named after the --help groups
([data], [model], [objective], [optimisation]); values take the flags' types (true/false for
switches, lists for multi-value flags). Precedence: main.py's defaults < each --config file in
the order given (--preset NAME is --config NAME, first) < the command line. The resolved
configuration is written as TOML beside the run (TRAIN_CKPT_PATH/config.toml) and saved in every
checkpoint; it reads back to the same configs.

from_args() is the only place flags become configs: each of the four dataclasses
(layout.DataConfig, model.ModelConfig, objectives.ObjectiveConfig, training.LoopConfig) takes the
flags named after its fields, so adding a setting is one field and one flag, and a flag that
reaches no field fails tests/test_config.py. The seed solution's own flags are accepted
(SEED_FLAGS): mapped onto the project's settings where they have an equivalent, otherwise noted in
one line saying what the project does instead.
"""
import argparse
import dataclasses
import math
import os

from layout import DataConfig, DataError

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(ROOT, "configs")

# Flags that steer the command line itself and are no setting of the run.
DRIVER_FLAGS = ("config", "preset", "print_config", "seed_notices")
# Flags that are no field of any config but decide fields' values (from_args): --use_ctr is the
# default of --use_userctr and --use_itemctr.
DERIVING_FLAGS = ("use_ctr",)


# ---------------------------------------------------------------------------------------------
# The seed solution's flags
# ---------------------------------------------------------------------------------------------

# Seed flags without an equivalent here: accepted, and the run starts with this one-line notice.
SEED_NOTICES = {
    "--max_grad_norm": "gradient clipping is --clip_norm (the seed had both flags and clipped with --clip_norm)",
    "--head_ratio": "the seed never used it; popularity enters through the logQ correction (--logq)",
    "--pop_beta": "the seed never used it; popularity enters through the logQ correction (--logq)",
    "--inference_only": "inference is infer.py (python infer.py, or infer() from the harness)",
    "--tf32": "TF32 matmuls are on by themselves on CUDA",
    "--deterministic": "CPU runs are always bit-for-bit deterministic; CUDA kernels are left as they are",
    "--persistent_workers": "loader workers are started each epoch (they read the epoch's number)",
    "--l2_emb": "embedding rows take no weight decay; --weight_decay applies to the dense weights",
    "--time_diff_log_base": "the gap to the previous event is bucketed by log2 (32 buckets) and fed as its log too",
    "--time_diff_max_bucket": "the gap to the previous event is bucketed by log2 (32 buckets) and fed as its log too",
    "--train_item_only": "training always reads the users' sequences; there is no item-only mode",
}
# Seed flags that are another name for a project flag: seed flag -> project flag.
SEED_ALIASES = {
    "--hstu_activation": "--hstu_attn",
    "--grad_checkpointing": "--grad_checkpoint",
    "--use_user_id_emb": "--use_user_id",
    "--use_item_id_emb": "--use_item_id",
    "--w_click": "--click_weight",
    "--w_expo": "--expo_weight",
    "--state_dict_path": "--resume",
}
# Every seed flag main.py accepts, for the tests: the aliases, the notices, the ones the project
# implements under the seed's own name, and the shared ones.
SEED_OWN_NAMES = ("--rankloss_tau", "--rankloss_weights", "--click_actions", "--expo_actions", "--no_use_senet",
                  "--weight_cap", "--rope_theta", "--rope_dim", "--senet_reduction", "--prefetch_factor")
# The actions the layout defines (docs/DATA_FORMAT.md): exposure 0; click 1 and conversion 2 count as clicks.
CLICK_ACTIONS, EXPO_ACTIONS = {1, 2}, {0}


class SeedNotice(argparse.Action):
    """A seed flag the project has no equivalent for: its value is parsed and dropped, and the
    notice is kept in args.seed_notices for the run to print."""

    def __init__(self, option_strings, dest, notice="", **kw):
        self.notice = notice
        super().__init__(option_strings, "seed_notices", default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, ns, values, option_string=None):
        notes = list(getattr(ns, "seed_notices", []))
        notes.append(f"notice: {option_string} (a seed flag) is accepted and ignored: {self.notice}")
        setattr(ns, "seed_notices", notes)


def action_set(text: str) -> set:
    """'1' or '1,2' -> {1, 2} (the seed's --click_actions / --expo_actions)."""
    try:
        out = {int(x) for x in str(text).split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected action types such as 1 or 1,2, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected action types such as 1 or 1,2, got {text!r}")
    return out


def rank_weights(text: str) -> str:
    """'1.0,0.6,0.4,0.2' (up to 4 non-negative numbers: positive, clicked, exposed, random), or ''."""
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        vals = None
    if vals is None or len(vals) > 4 or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected up to 4 non-negative numbers such as 1.0,0.6,0.4,0.2, got {text!r}")
    return ",".join(repr(v) for v in vals)


def add_seed_flags(p: argparse.ArgumentParser) -> None:
    """The seed solution's main.py flags that the project has under another name or not at all."""
    g = p.add_argument_group("seed compatibility", "the seed solution's flags, so its commands run unchanged "
                             "(the project's own flags are above)")
    for seed, own in SEED_ALIASES.items():
        act = next(a for a in p._actions if own in a.option_strings)
        kw = {k: getattr(act, k) for k in ("type", "choices", "nargs", "const") if getattr(act, k) is not None}
        g.add_argument(seed, dest=act.dest, default=argparse.SUPPRESS, **kw, help=f"the seed's name for {own}")
    g.add_argument("--no_use_senet", dest="use_senet", action="store_false", default=argparse.SUPPRESS,
                   help="the seed's switch for --use_senet 0")
    g.add_argument("--click_actions", type=action_set, default=argparse.SUPPRESS,
                   help="the seed's click action types; the layout's are 1 (click) and 2 (conversion): "
                        "other sets are refused")
    g.add_argument("--expo_actions", type=action_set, default=argparse.SUPPRESS,
                   help="the seed's exposure action types; the layout's is 0: other sets are refused")
    for name, notice in SEED_NOTICES.items():
        g.add_argument(name, action=SeedNotice, nargs="?", notice=notice, help=f"accepted, no effect: {notice}")


def check_seed_actions(args) -> None:
    """--click_actions / --expo_actions must describe the layout's own action types."""
    click, expo = getattr(args, "click_actions", None), getattr(args, "expo_actions", None)
    for name, got, ok in (("click_actions", click, click is None or (1 in click and click <= CLICK_ACTIONS)),
                          ("expo_actions", expo, expo is None or expo == EXPO_ACTIONS)):
        if not ok:
            want = "1 or 1,2" if name == "click_actions" else "0"
            raise DataError(f"--{name} {','.join(map(str, sorted(got)))}: this project reads action types as the "
                            f"layout defines them (exposure 0; click 1 and conversion 2 count as clicks); expected {want}")


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------

def _toml():
    try:
        import tomllib
        return tomllib
    except ModuleNotFoundError:            # Python < 3.11
        try:
            import tomli
            return tomli
        except ModuleNotFoundError:
            raise DataError("--config needs Python 3.11+ (tomllib) or the tomli package") from None


def config_path(name: str) -> str:
    """A config file's path: as given when it names a file, else configs/NAME.toml."""
    if os.path.isfile(name):
        return name
    cand = os.path.join(CONFIG_DIR, name if name.endswith(".toml") else name + ".toml")
    if os.path.isfile(cand):
        return cand
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml")) if os.path.isdir(CONFIG_DIR) else []
    raise DataError(f"{name}: no such config file (--config), expected a TOML file or one of: {', '.join(known)}")


def _actions(p: argparse.ArgumentParser) -> dict:
    """dest -> the project's own action of that setting (first option string without --)."""
    out = {}
    for a in p._actions:
        if a.option_strings and a.dest not in ("help",) and not isinstance(a, SeedNotice) and \
                a.default is not argparse.SUPPRESS:
            out.setdefault(a.dest, a)
    return out


def _tokens(key: str, value, act: argparse.Action, where: str) -> list:
    """A config file's `key = value` as the command-line tokens of its flag."""
    opt = act.option_strings[0]
    if isinstance(value, dict):
        raise DataError(f"{where}: [{key}] is a table inside a table, expected flag = value pairs")
    if isinstance(value, bool):
        if isinstance(act, argparse._StoreTrueAction):
            return [opt] if value else []
        return [opt, "1" if value else "0"]
    if isinstance(value, list):
        if act.nargs not in ("*", "+"):
            raise DataError(f"{where}: {key} = {value!r}: expected one value, not a list")
        return [opt, *map(str, value)]
    if isinstance(value, (int, float, str)):
        if act.nargs in ("*", "+"):
            return [opt, *str(value).split()]
        return [opt, repr(value) if isinstance(value, float) else str(value)]
    raise DataError(f"{where}: {key} = {value!r}: expected a number, a string, true/false or a list")


def file_argv(path: str, p: argparse.ArgumentParser) -> list:
    """The command-line tokens a config file stands for; every key checked against the parser
    (one DataError line naming the file and the key otherwise)."""
    toml = _toml()
    try:
        with open(path, "rb") as f:
            doc = toml.load(f)
    except toml.TOMLDecodeError as e:
        raise DataError(f"{path}: not valid TOML ({e})") from None
    acts, groups = _actions(p), {g.title for g in p._action_groups}
    out = []
    for key, value in doc.items():
        items = [(key, value, path)]
        if isinstance(value, dict):
            if key not in groups and key not in ("optimisation", "loop"):
                raise DataError(f"{path}: [{key}]: unknown table, expected flag = value pairs at the top level or in "
                                f"[data], [model], [objective], [optimisation]")
            items = [(k, v, f"{path} [{key}]") for k, v in value.items()]
        for k, v, where in items:
            if k in ("config", "preset", "print_config"):
                raise DataError(f"{where}: {k}: a config file cannot name another config file or preset")
            act = acts.get(k)
            if act is None:
                raise DataError(f"{where}: {k}: not a main.py setting (see python main.py --help)")
            out += _tokens(k, v, act, where)
    return out


def parse(p: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """Flags with --preset / --config files applied first (in order), the command line last."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    names = ([known.preset] if known.preset else []) + known.config
    tokens = []
    for name in names:
        path = config_path(name)
        ftokens = file_argv(path, p)
        _check_file_values(p, ftokens, path)
        tokens += ftokens
    args = p.parse_args(tokens + list(argv))
    args.config = [config_path(n) for n in names]
    return args


def _check_file_values(p: argparse.ArgumentParser, tokens: list, path: str) -> None:
    """Parse a file's tokens alone so a bad value is named with the file, not as a flag typed."""
    class Probe(type(p)):
        def error(self, message):
            raise DataError(f"{path}: {message}")
    probe = Probe(add_help=False)
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            probe._add_action(a)
    probe.parse_args(tokens)


def dump_toml(args: argparse.Namespace, p: argparse.ArgumentParser, header: str = "") -> str:
    """The resolved settings as a config file, one table per --help group (unset values left out)."""
    acts = _actions(p)
    lines = [f"# {ln}" if ln else "#" for ln in header.splitlines()]
    for g in p._action_groups:
        rows = []
        for a in g._group_actions:
            if a.dest not in acts or acts[a.dest] is not a or a.dest in DRIVER_FLAGS:
                continue
            v = getattr(args, a.dest, None)
            if v is None:
                rows.append(f"# {a.dest}: unset ({(a.help or '').split(';')[0][:80]})")
            else:
                rows.append(f"{a.dest} = {_toml_value(v)}")
        if rows:
            lines += ["", f"[{g.title}]", *rows]
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple, set)):
        return "[" + ", ".join(_toml_value(x) for x in (sorted(v) if isinstance(v, set) else v)) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def settings(args: argparse.Namespace) -> dict:
    """The run's settings as saved in checkpoints ("args"): every flag but the drivers."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items() if k not in DRIVER_FLAGS}


# ---------------------------------------------------------------------------------------------
# Flags -> configs
# ---------------------------------------------------------------------------------------------

def config_classes():
    from model import ModelConfig
    from objectives import ObjectiveConfig
    from training import LoopConfig
    return {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig, "loop": LoopConfig}


def from_args(args: argparse.Namespace):
    """The run's four frozen configs from parsed flags: each dataclass takes the flags named after
    its fields. --use_userctr / --use_itemctr default to --use_ctr."""
    from training import RunConfig
    v = dict(vars(args))
    for side in ("use_userctr", "use_itemctr"):
        if v.get(side) is None:
            v[side] = bool(v.get("use_ctr", False))
    built = {}
    for name, cls in config_classes().items():
        built[name] = cls(**{f.name: v[f.name] for f in dataclasses.fields(cls) if f.name in v})
    return RunConfig(**built)
