"""Flags, config files and the seed's flags reach the frozen configs, each setting in one place."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import config as CF
import main as M
from layout import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_every_flag_reaches_exactly_one_config():
    """Adding a setting is one field and one flag: a flag whose name is no config field (and is no
    driver, deriving or seed-compatibility flag) fails here, and no field lives in two configs."""
    fields = {}
    for name, cls in CF.config_classes().items():
        for f in dataclasses.fields(cls):
            assert f.name not in fields, f"{f.name} is a field of both {fields[f.name]} and {name}"
            fields[f.name] = name
    seed_only = {"click_actions", "expo_actions"}
    for a in M.parser()._actions:
        if not a.option_strings or a.dest == "help":
            continue
        assert a.dest in fields or a.dest in CF.DRIVER_FLAGS + CF.DERIVING_FLAGS or a.dest in seed_only, \
            f"{a.option_strings[0]} reaches no config"


def test_flag_values_land_in_their_configs():
    cfg = CF.from_args(M.get_args(["--maxlen", "7", "--hidden_units", "24", "--num_neg", "-1", "--lr", "0.01",
                                   "--use_ctr", "--use_itemctr", "0", "--hard_neg_refresh", "9"]))
    assert cfg.data.maxlen == 7 and cfg.model.hidden_units == 24 and cfg.objective.num_neg == -1
    assert cfg.loop.lr == 0.01 and cfg.objective.hard_neg_refresh == 9
    assert cfg.data.use_userctr is True and cfg.data.use_itemctr is False      # --use_ctr is the default only
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loop.lr = 1.0


def test_defaults_of_the_configs_match_the_command_line():
    """A config built with no flag equals each dataclass's own defaults (no second set of defaults)."""
    cfg = CF.from_args(M.get_args([]))
    for name, cls in CF.config_classes().items():
        mine, default = getattr(cfg, name).to_dict(), cls().to_dict()
        # the flags' "decide from the data" values: --mm_emb_id (81 when present) and the CTR
        # channels (--use_ctr), resolved by training.resolve_data and from_args
        auto = ("mm_emb_id", "use_userctr", "use_itemctr")
        diff = {k: (mine[k], default[k]) for k in mine if mine[k] != default[k] and k not in auto}
        assert not diff, f"{name}: flag defaults differ from the dataclass: {diff}"


# (seed flag and value, where it lands, the value there)
SEED_FLAGS = [
    (["--rankloss_tau=0.6"], "objective", "rankloss_tau", 0.6),
    (["--rankloss_weights=1.0,0.6,0.4,0.2"], "objective", "rankloss_weights", "1.0,0.6,0.4,0.2"),
    (["--w_click", "3.0"], "objective", "click_weight", 3.0),
    (["--w_expo", "0.5"], "objective", "expo_weight", 0.5),
    (["--weight_cap", "6"], "objective", "weight_cap", 6.0),
    (["--no_use_senet"], "model", "use_senet", False),
    (["--senet_reduction", "4"], "model", "senet_reduction", 4),
    (["--use_item_id_emb", "0"], "model", "use_item_id", False),
    (["--use_user_id_emb", "0"], "model", "use_user_id", False),
    (["--grad_checkpointing", "1"], "model", "grad_checkpoint", True),
    (["--hstu_activation", "silu"], "model", "hstu_attn", "silu"),
    (["--rope_theta", "500"], "model", "rope_theta", 500.0),
    (["--rope_dim", "8"], "model", "rope_dim", 8),
    (["--prefetch_factor", "4"], "loop", "prefetch_factor", 4),
    (["--state_dict_path", "x/model.pt"], "loop", "resume", "x/model.pt"),
    (["--use_rel_bias=1"], "model", "use_rel_bias", True),
    (["--use_rankloss=0"], "objective", "use_rankloss", False),
    (["--first_epoch_id_item_dropout"], "loop", "first_epoch_id_item_dropout", 0.5),
]


@pytest.mark.parametrize("argv,where,field,value", SEED_FLAGS, ids=[a[0][0] for a in SEED_FLAGS])
def test_seed_flag_lands_on_the_project_setting(argv, where, field, value):
    assert getattr(getattr(CF.from_args(M.get_args(argv)), where), field) == value


@pytest.mark.parametrize("flag", list(CF.SEED_NOTICES))
def test_seed_flag_without_equivalent_is_a_notice(flag):
    args = M.get_args([flag, "1"] if flag not in ("--inference_only", "--tf32", "--deterministic",
                                                   "--persistent_workers", "--train_item_only") else [flag])
    assert CF.from_args(args) == CF.from_args(M.get_args([]))          # changes nothing
    assert len(args.seed_notices) == 1 and args.seed_notices[0].startswith(f"notice: {flag} (a seed flag)")


def test_the_seed_run_sh_command_parses():
    """The seed repository's run.sh training flags, as written there."""
    argv = ("--use_ctr --use_userctr --use_itemctr --ctr_dir x --use_rankloss=0 --rankloss_mode=pairwise "
            "--lambda_rank=0.3 --rankloss_tau=0.6 --rankloss_weights=1.0,0.6,0.4,0.2 --click_actions=1 "
            "--expo_actions=0 --head_ratio=0.2 --use_rel_bias=1 --use_timefeat --norm_first --norm_type=rmsnorm "
            "--encoder_type=hstu --dqk=32 --dv=64 --num_blocks=10 --num_heads=8 --dropout_rate=0.2 --batch_size=64 "
            "--lr=0.002 --warmup_steps=2666 --clip_norm=1.0 --temperature=0.03 --num_epochs=8 --pin_memory "
            "--gradient_accumulation_steps=4").split()
    args = M.get_args(["--config", "seed", *argv])
    M.check_args(args)
    cfg = CF.from_args(args)
    assert (cfg.model.num_blocks, cfg.model.dv, cfg.loop.batch_size, cfg.objective.lambda_rank) == (10, 64, 64, 0.3)
    assert cfg.model.use_rope and cfg.model.use_senet and cfg.model.senet_reduction == 4       # the seed's defaults
    assert (cfg.objective.click_weight, cfg.objective.expo_weight) == (3.0, 0.5)
    assert cfg.loop.first_epoch_id_item_dropout == 0.5 and cfg.data.use_timefeat
    assert [n.split()[1] for n in args.seed_notices] == ["--head_ratio"]


@pytest.mark.parametrize("argv", [["--click_actions", "2"], ["--expo_actions", "0,1"], ["--click_actions", "x"]])
def test_other_action_sets_are_refused(argv):
    with pytest.raises((DataError, SystemExit)):
        M.check_args(M.get_args(argv))


def test_precompute_ctr_accepts_the_seed_eps(tmp_path):
    import precompute_ctr as PC
    assert PC.get_args(["--seq_path", "s", "--output_dir", "o", "--eps", "1e-5"]).seq_path == "s"


@pytest.mark.parametrize("name", ["demo", "taac1m", "seed", "s3rec", "movielens"])
def test_config_file_round_trip(name, tmp_path):
    """A resolved configuration written as TOML reads back to the same configs."""
    args = M.get_args(["--config", name, "--seed", "3"])
    f = tmp_path / "c.toml"
    f.write_text(CF.dump_toml(args, M.parser()))
    assert CF.from_args(M.get_args(["--config", str(f)])) == CF.from_args(args)


def test_precedence_defaults_files_then_flags(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("lr = 0.01\n[model]\nhidden_units = 32\nuse_senet = true\n")
    b.write_text("[optimisation]\nlr = 0.02\n")
    cfg = CF.from_args(M.get_args(["--config", str(a), "--config", str(b), "--hidden_units", "48"]))
    assert cfg.loop.lr == 0.02 and cfg.model.hidden_units == 48 and cfg.model.use_senet
    assert CF.from_args(M.get_args(["--preset", "taac1m"])).model.num_blocks == 10


def test_public_configs_are_the_former_flag_lists():
    """configs/s3rec.toml is bench/public.py's former s3rec flag list (checked bit-identical in training),
    with the encoder each family's validation chose since: the transformer, and for MovieLens its
    relative position/time bias."""
    old = ("--hidden_units 64 --num_blocks 1 --num_heads 1 --dqk 64 --dv 64 --attn_dropout 0.2 --item_tower id "
           "--score dot --query_head 0 --use_type_emb 0 --use_user_token 0 --use_user_id 0 --use_timefeat 0 "
           "--num_neg -1 --lr 2e-3 --warmup_steps 200 --weight_decay 0.01 --clip_norm 1 --batch_size 128 "
           "--emb_init_std 0.02 --length_bucketing 0").split()
    assert CF.from_args(M.get_args(["--config", "s3rec"])) == CF.from_args(M.get_args(
        old + "--maxlen 50 --dropout_rate 0.3 --num_epochs 30 --patience 8 --encoder_type transformer".split()))
    assert CF.from_args(M.get_args(["--config", "movielens"])) == CF.from_args(M.get_args(
        old + "--maxlen 200 --dropout_rate 0.2 --patience 20 --encoder_type transformer --use_rel_bias 1".split()))


@pytest.mark.parametrize("text,expected", [
    ("lr = \n", "not valid TOML"),
    ("learning_rate = 0.1\n", "learning_rate: not a main.py setting"),
    ("[nope]\nlr = 0.1\n", "[nope]: unknown table"),
    ("lr = \"fast\"\n", "argument --lr: invalid float value: 'fast'"),
    ("config = \"x\"\n", "config: a config file cannot name another"),
    ("maxlen = [1, 2]\n", "maxlen = [1, 2]: expected one value"),
])
def test_bad_config_file_is_one_line(tmp_path, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        M.get_args(["--config", str(f)])
    assert str(e.value).startswith(str(f)) and expected in str(e.value) and "\n" not in str(e.value)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(DataError, match="no such config file .* one of: cold, demo, movielens, s3rec, seed, taac1m"):
        M.get_args(["--config", "nosuch"])


def test_print_config_exits_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", "s3rec", "--print_config"],
                       capture_output=True, text=True, cwd=tmp_path, env={"PATH": "", "TRAIN_DATA_PATH": "/nonexistent"})
    assert r.returncode == 0 and "item_tower = \"id\"" in r.stdout and "[model]" in r.stdout


def test_infer_notes_flags_it_does_not_know(capsys):
    import infer
    args = infer.get_args(["--top_k", "5", "--num_blocks=10", "--use_rel_bias", "1"])
    assert args.top_k == 5
    assert "infer.py ignores --num_blocks, --use_rel_bias: not an inference flag" in capsys.readouterr().err
