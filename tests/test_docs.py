"""Docs that cannot go stale: the README's config block is the built-in default config, and every
`rlp` flag the README shows exists."""

import re
from pathlib import Path

import yaml

from rlp_cli.config import flatten, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_config_block_is_the_default_config():
    section = README.split("## A run config", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    shown = flatten(yaml.safe_load(block))
    actual = flatten(load_config("default").to_dict())
    assert shown, "no config block found"
    wrong = {k: (v, actual.get(k, "<no such key>")) for k, v in shown.items() if actual.get(k, object()) != v}
    assert not wrong, f"README shows (value, but default.yaml says): {wrong}"


def _commands():
    """(subcommand, flags) for every `rlp SUB ...` line in the README's code blocks and tables."""
    for line in README.splitlines():
        for match in re.finditer(r"\brlp (train|ablate|eval|report|bench|ls|validate)\b([^`|#]*)", line):
            yield match.group(1), set(re.findall(r"(--[a-z][a-z0-9-]*)", match.group(2)))


def test_every_flag_the_readme_shows_exists():
    from typer.main import get_command

    from rlp_cli.cli import app

    commands = get_command(app).commands
    missing = []
    for sub, flags in _commands():
        known = {opt for param in commands[sub].params for opt in getattr(param, "opts", []) + getattr(
            param, "secondary_opts", [])}
        missing += [f"rlp {sub} {flag}" for flag in flags if flag not in known]
    assert not missing, missing


def test_the_demo_page_shows_the_committed_run():
    """docs/demo.md's probe table is the run committed in docs/demo-run/ (the artifact behind the numbers)."""
    import json

    page = (ROOT / "docs" / "demo.md").read_text()
    rows = [json.loads(line) for line in (ROOT / "docs" / "demo-run" / "metrics.jsonl").read_text().splitlines()]
    probe = {r["step"]: r for r in rows if "probe/info_gain" in r}
    shown = {int(m.group(1)): (float(m.group(2)), float(m.group(3)))
             for m in re.finditer(r"^\| (\d+) \| ([+-]\d\.\d{3}) \| [^|]+\| (\d\.\d{3}) \|", page, re.M)}
    assert len(shown) >= 3
    for step, (info_gain, content_gain) in shown.items():
        assert round(probe[step]["probe/info_gain"], 3) == info_gain, step
        assert round(probe[step]["probe/content_gain"], 3) == content_gain, step
