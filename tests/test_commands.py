"""Every command line written in README.md, docs/ and the yaml comments builds its Config (nothing
is trained): values are parsed as written, dicts and lists in yaml flow style included."""
import re
import shlex
import sys
from pathlib import Path

import pytest

from recbole_llm.config import Config

REPO = Path(__file__).resolve().parents[1]


def documented_commands():
    commands = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in path.read_text().splitlines():
            if "run_recbole_llm.py --" in line:
                command = line.split("run_recbole_llm.py", 1)[1].split("#")[0]
                commands.append((f"{path.name}: {line.strip()[:60]}", shlex.split(command)))
    for path in sorted((REPO / "properties" / "model").glob("*.yaml")):
        fragments = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if re.match(r"#\s+--", line)]
        if fragments:  # "the paper's setting" lines: options for this model
            commands.append((f"{path.name} comments", [f"--model={path.stem}", "--dataset=ml-100k",
                                                        *shlex.split(" ".join(fragments))]))
    return commands


COMMANDS = documented_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("where, args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_builds_its_config(where, args, monkeypatch):
    named = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
    if "config_files" in named:
        pytest.skip("names the user's own yaml files")
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", *args])
    config = Config(model=named["model"], dataset=named["dataset"])
    for key, value in named.items():
        if value.strip()[:1] in "{[":
            assert isinstance(config[key], (dict, list)), f"{where}: --{key} stayed {config[key]!r}"
        if value.strip() == "~":
            assert config[key] is None, f"{where}: --{key}"


def test_yaml_flow_values_and_errors_on_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--backbone_args={model: GRU4Rec, epochs: 10}",
                                      "--cold_user_args={inter_num: 3}", "--eval_max_users=~",
                                      "--eval_args={'split': {'LS': 'valid_and_test'}, 'order': 'TO', 'mode': 'uni19'}"])
    config = Config(model="ALLMRec", dataset="ml-100k")
    assert config["backbone_args"] == {"model": "GRU4Rec", "epochs": 10}
    assert config["cold_user_args"] == {"inter_num": 3}
    assert config["eval_max_users"] is None
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    monkeypatch.setattr(sys, "argv", ["prog", "--backbone_args={model: [SASRec"])
    with pytest.raises(ValueError, match="--backbone_args"):
        Config(model="ALLMRec", dataset="ml-100k")


def test_interval_strings_stay_strings_on_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--user_inter_num_interval=[5,inf)"])
    assert Config(model="BPR", dataset="ml-100k")["user_inter_num_interval"] == "[5,inf)"
