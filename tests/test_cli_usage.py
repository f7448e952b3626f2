"""A new user's mistakes: one `error:` line and exit 2 (never a traceback), -h, flags shown as flags, eval's backend."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from lrdeploy.cli import app
from lrdeploy.errors import LrdError
from lrdeploy.runtime import backends
from lrdeploy.runtime.backends import adapter_beside, auto_backend, detect_backend

COMMANDS = ("compress", "eval", "export", "inspect", "bench")
FLAGS = {  # every boolean flag of every command
    "compress": ("--no-whiten", "--no-fallback", "--resume", "--force", "--json", "--quiet"),
    "eval": ("--json", "--quiet"),
    "export": ("--merge", "--force", "--json"),
    "inspect": ("--verify", "--json"),
    "bench": ("--json", "--quiet"),
}


def one_error(code: int, out: str, err: str) -> str:
    """The single `error:` line of a usage mistake, after checking exit 2, nothing else on stderr, no traceback."""
    assert code == 2
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_mistyped_command(cli):
    line = one_error(*cli("exprot"))
    assert line == "error: no such command 'exprot'. Did you mean 'export'? (see 'lrdeploy --help')"


def test_compress_without_source(cli):
    assert one_error(*cli("compress")).lower() == "error: missing argument 'source' (see 'lrdeploy compress --help')"


def test_unknown_option(cli):
    line = one_error(*cli("inspect", "--bogus", "x"))
    assert line == "error: no such option: --bogus (see 'lrdeploy inspect --help')"


def test_flag_takes_no_value(cli):
    line = one_error(*cli("inspect", "some.gguf", "--json", "true"))
    assert "unexpected extra argument" in line and "(true)" in line


def test_bare_lrdeploy_prints_the_help_and_exits_2(cli):
    code, out, err = cli()
    assert code == 2 and out == ""
    assert "Traceback" not in err and "error:" not in err
    assert err.startswith("Usage: lrdeploy [OPTIONS] COMMAND")
    for name in COMMANDS:
        assert re.search(rf"^  {name} ", err, re.M), name


@pytest.mark.parametrize("name", ("", *COMMANDS))
def test_dash_h_is_help(cli, name):
    args = (name,) if name else ()
    code, short, err = cli(*args, "-h")
    assert (code, err) == (0, "")
    assert short.startswith(f"Usage: lrdeploy {name}".rstrip() + " ")
    assert (0, short, "") == cli(*args, "--help")


@pytest.mark.parametrize("name", COMMANDS)
def test_boolean_flags_show_as_flags(cli, name):
    code, out, _ = cli(name, "--help")
    assert code == 0
    assert "<bool>" not in out and "BOOLEAN" not in out
    helps = {o: p.help for p in typer.main.get_command(app).commands[name].params for o in p.opts}
    for flag in FLAGS[name]:
        line = next(x for x in out.splitlines() if re.match(rf"\s+(-\w, )?{flag}\b", x))
        assert line.split(flag, 1)[1].split()[0] == helps[flag].split()[0], line  # the help follows: no value


def test_usage_error_in_a_real_process():
    """What a user sees: the console script, not the in-process runner."""
    exe = Path(sys.executable).with_name("lrdeploy")
    res = subprocess.run([str(exe), "exprot"], capture_output=True, text=True, timeout=120)
    assert one_error(res.returncode, res.stdout, res.stderr).startswith("error: no such command 'exprot'")


# ------------------------------------------------------------------------------------------------- eval --backend


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_auto_backend_from_the_path(tmp_path):
    gguf_dir, onnx_dir, art, hf = (tmp_path / d for d in ("gguf", "onnx", "art", "hf"))
    touch(gguf_dir / "model.gguf")
    touch(onnx_dir / "model.onnx")
    touch(art / "lrdeploy.json")
    touch(hf / "config.json")
    assert auto_backend(str(gguf_dir)) == "llamacpp"
    assert auto_backend(str(touch(tmp_path / "x.gguf"))) == "llamacpp"
    assert auto_backend(str(onnx_dir)) == "onnxruntime"
    assert auto_backend(str(touch(tmp_path / "x.onnx"))) == "onnxruntime"
    assert auto_backend(str(art)) == "torch"
    assert auto_backend(str(hf)) == "torch" and detect_backend(hf) is None
    assert auto_backend("smollm2") == "torch"


@pytest.fixture
def opened(monkeypatch):
    """Calls that eval makes to open its model, recorded instead of loading anything."""
    calls = []

    def fake(source, backend, **kw):
        calls.append((source, backend, kw.get("lora")))
        raise LrdError("stopped before loading")

    monkeypatch.setattr(backends, "open_backend", fake)
    return calls


@pytest.mark.parametrize("kind,backend", (("gguf", "llamacpp"), ("onnx", "onnxruntime")))
def test_eval_defaults_to_the_export_backend(cli, tmp_path, opened, kind, backend):
    touch(tmp_path / f"out-{kind}" / f"model.{kind}")
    code, _, err = cli("eval", tmp_path / f"out-{kind}")
    assert (code, err) == (2, "error: stopped before loading\n")
    assert opened == [(str(tmp_path / f"out-{kind}"), backend, None)]


def test_gguf_file_on_llamacpp_gets_the_adapter_beside_it(tmp_path, monkeypatch):
    from lrdeploy.runtime import llamacpp

    base, adapter = touch(tmp_path / "model.gguf"), touch(tmp_path / "adapter.gguf")
    got = []
    monkeypatch.setattr(llamacpp, "open_llamacpp", lambda path, lora, **kw: got.append((path, lora)))
    backends.open_backend(str(base), "auto")
    backends.open_backend(str(base), "llamacpp", lora=tmp_path / "other.gguf")
    assert got == [(base, adapter), (base, tmp_path / "other.gguf")]
    assert adapter_beside(adapter) is None and adapter_beside(tmp_path) is None


def test_named_model_on_llamacpp_opens_its_gguf(tmp_path, monkeypatch):
    """`lrdeploy eval smollm2 --backend llamacpp` runs the GGUF file the name stands for (a file, not a name)."""
    from lrdeploy.compressor.sources import smollm2_path
    from lrdeploy.runtime import llamacpp

    got = []
    monkeypatch.setattr(llamacpp, "open_llamacpp", lambda path, lora, **kw: got.append((path, lora)))
    backends.open_backend("smollm2", "llamacpp")
    assert got == [(smollm2_path(), None)]


def test_gguf_on_torch_warns_about_the_adapter_beside_it(cli, tmp_path, opened):
    from lrdeploy.compressor.sources import smollm2_path

    (tmp_path / "model.gguf").symlink_to(smollm2_path())
    touch(tmp_path / "adapter.gguf")
    code, _, err = cli("eval", tmp_path / "model.gguf", "--backend", "torch")
    assert code == 2 and opened == [(str(tmp_path / "model.gguf"), "torch", None)]
    assert err.splitlines() == [
        f"warning: --backend torch loads {tmp_path / 'model.gguf'} without the {tmp_path / 'adapter.gguf'} beside "
        "it; use --backend llamacpp to apply it",
        "error: stopped before loading",
    ]
    (tmp_path / "adapter.gguf").unlink()
    code, _, err = cli("eval", tmp_path / "model.gguf", "--backend", "torch")
    assert err == "error: stopped before loading\n"


# ------------------------------------------------------------------------------------------------ mistyped paths


@pytest.mark.parametrize("command", (("eval",), ("export", "--format", "gguf", "-o", "x"), ("compress", "-o", "x")))
def test_mistyped_path_is_not_a_hub_id(cli, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    name, *rest = command
    code, out, err = cli(name, "out/smollm2-caldra", *rest)
    assert one_error(code, out, err) == "error: no such file or directory: out/smollm2-caldra"


def test_org_name_without_such_folder_is_a_hub_id(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # HF_HUB_OFFLINE (conftest): the download fails at once
    code, out, err = cli("export", "no-such-org/no-such-model", "--format", "gguf", "-o", "x")
    assert one_error(code, out, err).startswith("error: cannot fetch 'no-such-org/no-such-model' from the hub")
