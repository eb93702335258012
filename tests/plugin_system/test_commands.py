"""Plugin subcommands: the ``twinkle_register_commands`` hook through real entry points."""

from __future__ import annotations

import ast

from conftest import run_python, write_dist

HELLO = {
    "hello_plugin.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_commands(register):
            register("hello", "hello_cli:configure", help="say hello")
            register("plugins", "hello_cli:configure", help="tries to take core's command")
    """,
    "hello_cli.py": """
        def configure(parser):
            parser.add_argument("--name", default="world")
            parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)
    """,
}
LATE = {
    "late_plugin.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_commands(register):
            register("hello", "nowhere_at_all:configure")
            register("bad", "nowhere_at_all:configure", help="its target does not import")
    """
}
RAISING = {
    "raising_cmd.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_commands(register):
            raise RuntimeError("commands blew up")
    """
}


def make_site(tmp_path):
    site = tmp_path / "site"
    write_dist(site, "twinkle-hello", "1.0", {"hello": "hello_plugin"}, HELLO)
    write_dist(site, "twinkle-late", "1.0", {"late": "late_plugin"}, LATE)
    write_dist(site, "twinkle-raising-cmd", "1.0", {"raising_cmd": "raising_cmd"}, RAISING)
    return site


CLI = "import sys; from twinkle.cli import main; sys.exit(main({argv!r}))"


def test_a_plugin_command_runs_with_its_options_and_exit_status(tmp_path):
    site = make_site(tmp_path)
    result = run_python(CLI.format(argv=["hello", "--name", "bob"]), site=site)
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "hello bob"


def test_help_lists_plugin_commands_without_importing_their_targets(tmp_path):
    site = make_site(tmp_path)
    code = """
        import sys
        from twinkle.cli import build_parser
        build_parser(['plugins']).print_help()
        print('hello_cli' in sys.modules)
    """
    result = run_python(code, site=site)
    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout and "say hello" in result.stdout
    assert result.stdout.strip().endswith("False")  # the target module was never imported


def test_collisions_and_a_raising_hook_are_skipped_with_warnings_naming_both(tmp_path):
    site = make_site(tmp_path)
    code = """
        import warnings
        from twinkle.commands import plugin_commands
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            commands = plugin_commands()
        print(sorted(commands), commands["hello"].plugin)
        for w in caught:
            print("W", w.message)
    """
    result = run_python(code, site=site)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    listed, owner = lines[0].rsplit(" ", 1)
    # core's own plot and export come through the same hook; serve when twinkle-server is installed
    assert owner == "hello" and set(ast.literal_eval(listed)) - {"serve"} == {"bad", "hello", "plot", "export"}
    warned = "\n".join(lines[1:])
    assert "'hello' registers the command 'plugins', which core already has" in warned
    assert "'late' registers the command 'hello', which plugin 'hello' already has" in warned
    assert "'raising_cmd': twinkle_register_commands raised RuntimeError: commands blew up" in warned
    # core's own command still works
    assert run_python(CLI.format(argv=["plugins", "--json"]), site=site).returncode == 0


def test_a_command_whose_target_fails_to_import_exits_nonzero_naming_it(tmp_path):
    result = run_python(CLI.format(argv=["bad"]), site=make_site(tmp_path))
    assert result.returncode == 1
    assert "the command 'bad' of plugin 'late' failed to load: ModuleNotFoundError" in result.stderr


def test_twinkle_serve_without_the_server_plugin_names_the_package(tmp_path):
    import importlib.util

    installed = importlib.util.find_spec("twinkle_server") is not None
    # where the session has the plugin, blocking it stands in for "not installed"
    env = {"TWINKLE_DISABLE_PLUGINS": "server"} if installed else {}
    result = run_python(CLI.format(argv=["serve", "--port", "0"]), env=env)
    assert result.returncode == 1, result.stderr
    if installed:
        assert "twinkle-server plugin ('server'), which is installed but blocked" in result.stderr
    else:
        assert "pip install twinkle-server" in result.stderr
        assert "pip install ./plugins/twinkle-server" in result.stderr
    help_text = run_python(CLI.format(argv=["--help"]), env=env).stdout
    assert "serve" in help_text and "twinkle-server" in help_text


def test_core_ships_no_server_code_and_no_service_dependencies():
    """`pip install twinkle-core` alone: no twinkle.server package, no fastapi/uvicorn/tinker requirement."""
    import importlib.util
    import re
    from pathlib import Path

    import twinkle

    assert importlib.util.find_spec("twinkle.server") is None
    assert not (Path(twinkle.__file__).parent / "server").exists()
    pyproject = (Path(__file__).resolve().parents[2] / "twinkle_core" / "pyproject.toml").read_text()
    requirements = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*[<>=!~]', pyproject)
    assert requirements and not {"fastapi", "uvicorn", "tinker"} & set(requirements), requirements
    # protobuf only for reading SentencePiece tokenizer files (the family-tokenizers extra), never the wire format
    protobuf_lines = [line.split("=")[0].strip() for line in pyproject.splitlines() if '"protobuf' in line]
    assert protobuf_lines == ["family-tokenizers"], protobuf_lines
