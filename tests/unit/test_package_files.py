"""What the packages ship beside the Python code (issue 12): the man pages, the bash completion,
debian/, the version, and `dmrepl doctor`'s remedies (unit tier).

Each file is held against the code it describes, so that a new command, option or config key
cannot be added without its documentation and completion."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

import dmrepl
from dmrepl import cli, config, doctor
from dmrepl.config import fencing, metrics, tunnel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPLETION = os.path.join(ROOT, "completion", "dmrepl")
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def parser_commands() -> dict[str, set[str]]:
    """'up' -> {'--config', ...}, 'secondary up' -> {...}: every command and its long options."""
    out = {}

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[prefix + name] = {o for a in sub._actions for o in a.option_strings
                                          if o.startswith("--") and o != "--help"}
                    walk(sub, prefix + name + " ")

    walk(cli.build_parser(), "")
    return out


def man_tables(text: str) -> dict[str, set[str]]:
    """Keys documented per table of dmrepl.toml(5): `.B key` after `.TP`, under `.SH TOP-LEVEL KEYS`
    or `.SS [table]`; [[primary.secondaries]]'s keys sit in an .RS block of 'secondaries'."""
    tables: dict[str, set[str]] = {}
    current = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SH "):
            current = "" if line == ".SH TOP-LEVEL KEYS" else None
        elif line.startswith(".SS ["):
            current = line[4:].strip("[]")
        elif line == ".RS" and current == "primary":
            current = "primary.secondaries"
        elif line == ".RE" and current == "primary.secondaries":
            current = "primary"
        elif current is not None and line.startswith(".B ") and i and lines[i - 1] == ".TP":
            tables.setdefault(current, set()).add(line[3:].strip())
    return tables


def test_the_config_man_page_documents_every_key_of_every_table():
    tables = man_tables(read("man", "dmrepl.toml.5"))
    assert tables == {
        "": set(config.TOP_KEYS) - {"primary", "secondary", "link", "metrics", "fencing"},
        "secondary": set(config.SECONDARY_KEYS),
        "primary": set(config.PRIMARY_KEYS),
        "primary.secondaries": set(config.PEER_KEYS),
        "link": set(tunnel.KEYS),
        "metrics": set(metrics.KEYS),
        "fencing": set(fencing.KEYS),
    }


def man_commands(text: str) -> dict[str, str]:
    """dmrepl(8)'s COMMANDS section: the first word of each .TP item's tag -> the item's text."""
    section = text.split(".SH COMMANDS", 1)[1].split("\n.SH ", 1)[0]
    items = {}
    for item in section.split(".TP\n")[1:]:
        tag = item.split("\n", 1)[0]
        word = re.match(r'\.(?:B|BI|BR) "?([a-z]+)', tag).group(1)
        items[word] = item
    return items


def test_the_command_man_page_documents_every_command_and_option():
    text = read("man", "dmrepl.8")
    items = man_commands(text)
    for command, options in parser_commands().items():
        first, *rest = command.split()
        assert first in items, f"dmrepl.8 has no item for {command}"
        item = items[first]
        if rest:
            tag = re.sub(r"\\f[BIRP]", "", item.split("\n", 1)[0])       # without roff's font changes
            assert re.search(rf"\b{rest[0]}\b", tag), command
        # --config and --json are described once, below the list
        for option in options - {"--config", "--json"}:
            assert option.replace("-", r"\-") in item, (command, option)
    assert r"\-\-config" in text and r"\-\-json" in text


def test_the_completion_lists_the_parser_own_commands_and_options():
    text = read("completion", "dmrepl")
    commands = parser_commands()
    top = re.search(r'local commands="([^"]*)"', text).group(1).split()
    assert sorted(top) == sorted(c for c in commands if " " not in c)
    secondary = re.search(r'local secondary_commands="([^"]*)"', text).group(1).split()
    assert sorted(secondary) == sorted(c.split()[1] for c in commands if c.startswith("secondary "))
    cases = dict(re.findall(r'^\s+"?([a-z ]+?)"?\) opts="([^"]*)"', text, re.M))
    assert {c: set(o.split()) for c, o in cases.items()} == {c: o for c, o in commands.items() if c != "secondary"}


@pytest.mark.skipif(not os.path.exists(BASH_COMPLETION),
                    reason="bash-completion is not installed (scripts/setup installs it)")
@pytest.mark.parametrize("words, expected", [
    (["dmrepl", "st"], ["status"]),
    (["dmrepl", "secondary", "f"], ["failover"]),
    (["dmrepl", "up", "--d"], ["--detach"]),
    (["dmrepl", "status", ""], ["vm1", "vm2"]),
    (["dmrepl", "failover", "vm"], ["vm1", "vm2"]),
    (["dmrepl", "secondary", "down", "v"], ["vm1", "vm2"]),
    (["dmrepl", "status", "vm1", "--j"], ["--json"]),
    (["dmrepl", "demo", "--k"], ["--keep"]),
    (["dmrepl", "resolve", "vm1", "--d"], ["--discard-my-data"]),
])
def test_bash_completes_commands_options_and_resource_names(tmp_path, words, expected):
    for name in ("vm1", "vm2"):
        (tmp_path / f"{name}.toml").write_text("")
    (tmp_path / "notes.txt").write_text("")
    script = (f"source {BASH_COMPLETION}; source {COMPLETION}; "
              "COMP_WORDS=(\"$@\"); COMP_CWORD=$(($# - 1)); COMP_LINE=\"$*\"; COMP_POINT=${#COMP_LINE}; "
              "_dmrepl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    env = dict(os.environ, DMREPL_COMPLETION_CONFIG_DIR=str(tmp_path))
    proc = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == expected


def test_versions_agree():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert dmrepl.__version__ == version
    changelog = read("debian", "changelog").splitlines()[0]
    assert changelog.startswith(f"dmrepl ({version}) "), changelog
    for page in ("dmrepl.8", "dmrepl.toml.5"):
        assert f'"dmrepl {version}"' in read("man", page).splitlines()[0], page


def test_the_debian_package_ships_every_file_meant_for_a_host():
    install = [line.split() for line in read("debian", "dmrepl.install").splitlines() if line.strip()]
    shipped = {src for src, _ in install}
    for src in shipped:
        assert os.path.isfile(os.path.join(ROOT, src)), src
    for d in ("udev", "ocf"):
        for name in os.listdir(os.path.join(ROOT, d)):
            assert f"{d}/{name}" in shipped, f"{d}/{name} is not in debian/dmrepl.install"
    assert dict(install)["ocf/dmrepl"] == "usr/lib/ocf/resource.d/dmrepl/"
    manpages = read("debian", "dmrepl.manpages").split()
    assert sorted(manpages) == sorted(f"man/{n}" for n in os.listdir(os.path.join(ROOT, "man")))
    control = read("debian", "control")
    depends = re.search(r"^Depends:(.*?)^\S", control.split("Package: dmrepl", 1)[1], re.M | re.S).group(1)
    tools = {w.strip(", \n") for w in depends.split() if not w.startswith("${")}
    # exactly the runtime tools dmrepl runs (dmrepl/tools.py), and udev; util-linux is essential
    from dmrepl import tools as tool_list
    assert tools == {t.package for t in tool_list.ALL if t.package != "util-linux"} | {"udev"}


def test_every_failed_doctor_check_names_its_package():
    for check in doctor.run_checks():
        if check.verdict != "fail":
            assert check.package is None and check.install is None, check
        elif check.name == "root":
            assert "sudo" in check.detail
        else:
            assert check.package and check.package in check.install, check


@pytest.mark.parametrize("in_venv, package, install", [
    (True, "pyudev", f"{sys.executable} -m pip install pyudev"),
    (False, "python3-pyudev", "apt-get install python3-pyudev"),
])
def test_doctor_names_the_python_package_for_the_interpreter_it_runs_on(monkeypatch, in_venv, package, install):
    real = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda m: None if m == "pyudev" else real(m))
    monkeypatch.setattr(doctor, "_in_venv", lambda: in_venv)
    checks = {c.name: c for c in doctor.python_checks()}
    assert checks["python pyudev"].verdict == "fail"
    assert (checks["python pyudev"].package, checks["python pyudev"].install) == (package, install)
    assert checks["python pyroute2"].verdict == "ok"


def test_the_installed_command_runs_doctor():
    """The console script beside this interpreter (the wheel's in scripts/test's wheel tier)."""
    command = os.path.join(os.path.dirname(sys.executable), "dmrepl")
    assert os.access(command, os.X_OK), f"no dmrepl command beside {sys.executable}"
    proc = subprocess.run([command, "doctor", "--json"], capture_output=True, text=True, timeout=120)
    out = json.loads(proc.stdout)
    assert proc.returncode == (0 if out["ok"] else 1), proc.stderr
    names = [c["name"] for c in out["checks"]]
    assert {"root", "device-mapper", "nbd", "nbdkit", "era_invalidate", "python pyroute2"} <= set(names)
    assert all(c["install"] for c in out["checks"] if c["verdict"] == "fail" and c["name"] != "root")
    assert shutil.which("dmrepl", path=os.path.dirname(sys.executable)) == command


def deferred_imports() -> set[str]:
    """Modules that dmrepl's daemon layers (everything but the CLI, the demo, doctor, ls and the
    lab) import inside a function: what a running daemon could still read from disk after an
    upgrade replaced the files."""
    import ast
    import importlib.util

    skip = ("cli", "demo.py", "demo_secondary.py", "doctor.py", "inventory.py", "lab.py")
    package = os.path.dirname(dmrepl.__file__)
    found = set()
    for dirpath, _dirs, names in os.walk(package):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), package)
            if not name.endswith(".py") or rel.split(os.sep)[0] in skip:
                continue
            with open(os.path.join(dirpath, name)) as f:
                tree = ast.parse(f.read())
            for func in ast.walk(tree):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(func):
                    if isinstance(node, ast.Import):
                        found.update(a.name for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.module:
                        for a in node.names:      # `from pkg import mod` names a module when it is one
                            sub = f"{node.module}.{a.name}"
                            found.add(sub if importlib.util.find_spec(node.module) and
                                      _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_a_daemon_loads_at_its_start_every_module_its_code_imports_late():
    from dmrepl.daemon import preload

    # primary_start's imports of the primary's daemon and policy break an import cycle; the
    # daemon that calls it has both loaded already.
    already_loaded = {"dmrepl.daemon.primary", "dmrepl.roles.primary"}
    listed = set(preload.DEFERRED) | set(preload.DEFERRED_WITH_TUNNEL)
    assert deferred_imports() - already_loaded == listed
