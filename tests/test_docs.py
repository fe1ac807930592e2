"""The documentation stays true: the flag reference matches the parsers, README points only inside
the repository and stays a short map."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import make_flags  # noqa: E402


def test_flag_reference_is_current():
    assert (ROOT / "docs/FLAGS.md").read_text() == make_flags.render(), "run python docs/make_flags.py"


def test_every_flag_of_main_is_documented():
    import main
    text = (ROOT / "docs/FLAGS.md").read_text()
    for a in main.parser()._actions:
        if a.option_strings and "-h" not in a.option_strings:
            assert f"`{max(a.option_strings, key=len)}" in text


def test_readme_is_a_self_contained_map():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert len(readme.splitlines()) <= 210
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"
    # the map names functions that exist
    for mod, fn in re.findall(r"`(\w+)\.py`: `(\w+)(?:\.\w+)?`", readme):
        assert re.search(rf"^(def|class) {fn}\b", (ROOT / f"{mod}.py").read_text(), re.M), (mod, fn)
