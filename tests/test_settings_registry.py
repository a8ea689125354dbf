"""One settings registry: every `VACE_*` variable is declared once (vace_local/core/config.py, extended by
server/settings.py), read through it and nowhere else, and every variable the docs name is declared there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The registry's modules: the only places that read `VACE_*` variables from the environment.
REGISTRY = {ROOT / "vace_local" / "core" / "config.py", ROOT / "server" / "settings.py"}
SCANNED = ("vace_local", "preprocessors", "server", "scripts", "vace_bench")
#: Knobs of the test suite itself (read in tests/, documented beside the tests they tune), not of the product.
TEST_KNOBS = re.compile(r"VACE_TEST_\w+|VACE_REALARCH_CACHE")
ENV_CALLS = {"get", "setdefault", "pop", "__getitem__", "__contains__"}


def _is_environ(node: ast.AST) -> bool:
    """`os.environ` or a bare `environ` (from os import environ)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def _vace_or_unknown(key: ast.AST | None) -> bool:
    """A key that is a `VACE_*` literal, or not a literal at all (it cannot be checked, so it is not allowed)."""
    if isinstance(key, ast.Constant) and isinstance(key.value, str):
        return key.value.upper().startswith("VACE_")
    return True


def env_reads(source: str) -> list[tuple[int, str]]:
    """(line, code) of each read of a `VACE_*` (or non-literal) variable from the process environment."""
    found = []
    for node in ast.walk(ast.parse(source)):
        key: ast.AST | None = None
        hit = False
        if isinstance(node, ast.Call):
            f = node.func
            getenv = (isinstance(f, ast.Attribute) and f.attr == "getenv") or (
                isinstance(f, ast.Name) and f.id == "getenv")
            if getenv or (isinstance(f, ast.Attribute) and f.attr in ENV_CALLS and _is_environ(f.value)):
                hit, key = True, node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            hit, key = True, node.slice
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            hit, key = True, node.left
        if hit and _vace_or_unknown(key):
            found.append((node.lineno, ast.unparse(node)[:100]))
    return found


def _scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if p not in REGISTRY)


def test_the_scanner_finds_each_kind_of_read() -> None:
    src = ("import os\nfrom os import environ, getenv\n"
           "a = os.environ.get('VACE_X')\nb = os.environ['VACE_Y']\nc = os.getenv('VACE_Z', '1')\n"
           "d = 'VACE_W' in os.environ\ne = environ.get(NAME)\nf = getenv('VACE_V')\n"
           "os.environ.setdefault('VACE_U', 'x')\n"
           # not reads of a VACE_ variable: other variables, writes, a copy for a child process
           "g = os.environ.get('HF_HUB_OFFLINE')\nos.environ['VACE_MAX_FRAMES'] = '9'\nh = dict(os.environ)\n")
    assert [line for line, _ in env_reads(src)] == [3, 4, 5, 6, 7, 8, 9]


def test_no_vace_variable_is_read_outside_the_registry() -> None:
    """`vace_settings()` (or the server's `Settings`) is the one way to read a `VACE_*` variable."""
    reads = [f"{p.relative_to(ROOT)}:{line}: {code}" for p in _scanned_files()
             for line, code in env_reads(p.read_text())]
    assert not reads, "read these through vace_local.core.config.vace_settings():\n" + "\n".join(reads)


def _documented() -> dict[str, set[str]]:
    """Each `VACE_*` name the README and docs/ mention → the files that mention it (`VACE_S3_*` is a prefix)."""
    names: dict[str, set[str]] = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for m in re.finditer(r"VACE_[A-Z0-9_]*", doc.read_text()):
            names.setdefault(m.group(0), set()).add(doc.name)
    return names


def test_every_documented_variable_is_in_the_registry() -> None:
    from server.settings import Settings
    from vace_local.core.config import env_name

    declared = {env_name(f) for f in Settings.model_fields}
    documented = _documented()
    assert len(documented) > 40  # the scan reads the real tables
    missing = sorted(f"{name} ({', '.join(sorted(docs))})" for name, docs in documented.items()
                     if not TEST_KNOBS.fullmatch(name)
                     and not (name in declared or (name.endswith("_") and any(d.startswith(name) for d in declared))))
    assert not missing, f"documented but not declared in the registry: {missing}"


def test_every_registry_variable_is_documented() -> None:
    from server.settings import Settings
    from vace_local.core.config import env_name

    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
    prefixes = re.findall(r"(VACE_\w*_)\*", text)  # `VACE_S3_*` documents every VACE_S3_ variable
    undocumented = [n for n in map(env_name, Settings.model_fields)
                    if not re.search(rf"\b{n}\b", text) and not any(n.startswith(p) for p in prefixes)]
    assert not undocumented, f"declared but documented nowhere (README / docs): {undocumented}"


@pytest.mark.parametrize(("var", "value", "words"), [
    ("VACE_MEDIA_MAX_SIDE", "-1", "VACE_MEDIA_MAX_SIDE"),
    ("VACE_MAX_FRAMES", "many", "VACE_MAX_FRAMES"),
])
def test_a_bad_value_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                                     words: str) -> None:
    from vace_local.core.config import vace_settings

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=words):
        vace_settings()


def test_the_registry_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vace_local.core.config import vace_settings
    from vace_local.core.media_limits import MediaLimits

    monkeypatch.setenv("VACE_MEDIA_MAX_SIDE", "640")
    assert MediaLimits.from_env().max_side == 640
    monkeypatch.setenv("VACE_MEDIA_MAX_SIDE", "320")
    assert MediaLimits.from_env().max_side == 320
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", "")  # empty is unset, as before
    assert vace_settings().annotators_dir is None


def test_generate_and_serve_take_the_engine_flags_from_one_declaration() -> None:
    """Both commands' engine options are made from `EngineSettings`' fields (same names, same help); `serve`'s
    help names each option's variable."""
    import click
    import typer

    from vace_local.cli import app
    from vace_local.core.config import EngineSettings, env_name

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    commands = {name: {o: p for p in group.get_command(ctx, name).params for o in (*p.opts, *p.secondary_opts)}
                for name in ("generate", "serve")}
    flagged = {name: f.json_schema_extra["flag"][0].split("/") for name, f in EngineSettings.model_fields.items()
               if isinstance(f.json_schema_extra, dict)}
    assert {"offload", "dtype", "attention", "cfg_batch", "compile", "fp8", "loras"} <= set(flagged)
    for field, decls in flagged.items():
        for name, opts in commands.items():
            assert all(d in opts for d in decls), (name, decls)
            assert EngineSettings.model_fields[field].description in opts[decls[0]].help
        assert env_name(field) in commands["serve"][decls[0]].help
        assert env_name(field) not in commands["generate"][decls[0]].help  # generate reads only its flags


def test_generate_refuses_a_bad_engine_option_naming_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vace_local.cli import app

    result = CliRunner().invoke(app, ["generate", "--model", "tiny", "--offload", "lots", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "offload" in result.output and "sequential" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["download", "annotators"], ["generate", "--model", "tiny"]])
def test_a_bad_variable_stops_a_command_at_once_naming_it(argv: list[str], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vace_local.cli import app

    result = CliRunner().invoke(app, [*argv], env={"VACE_MEDIA_MAX_SIDE": "0", "VACE_ANNOTATORS_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "VACE_MEDIA_MAX_SIDE" in result.output and "greater than 0" in result.output
    assert not any(tmp_path.iterdir())  # nothing was downloaded or written
