"""Shared fixtures: tiny random models of real llama-family shapes, and an in-process CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from random_model import make_random_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the CLI sets it: quiet children
REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "tools" / "data" / "wikitext2-valid.txt"


# Narrow random models and the cheap, resumable CLI options of the reliability and lock tests.
CHEAP = ["--method", "rtn", "--q-format", "q8_0", "--calib-tokens", "256", "--seq-len", "64", "--device", "cpu",
         "-q"]
RESUMABLE = ["--method", "ldlq", "--q-format", "q8_0", "--calib-range", "0:0.02", "--calib-tokens", "512", "--seq-len",
             "64", "--device", "cpu", "-q"]
NARROW = {"hidden": 64, "ffn": 128, "heads": 2, "kv_heads": 1}  # small enough for ldlq to take seconds on 2 cores


def narrow_rtn_artifact(root: Path, layers: int) -> tuple[Path, Path]:
    """A narrow random model (hidden 64: q8_0 fits, K-quants don't) and its q8_0 rtn artifact: (model, artifact)."""
    from lrdeploy.compressor.driver import CompressOptions, compress
    from lrdeploy.compressor.sources import open_source

    model = make_random_model(root / "model", layers=layers, **NARROW)
    opts = CompressOptions(method="rtn", q_format="q8_0", calib_tokens=256, seq_len=64, device="cpu")
    compress(open_source(str(model)), opts, root / "art")
    return model, root / "art"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """2 blocks, hidden 256, ffn 512, GQA 4/2: every dim a multiple of 256, so all K-quants fit per row."""
    return make_random_model(tmp_path_factory.mktemp("tiny") / "llama", layers=2, tie=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """qwen2 carries q/k/v biases."""
    return make_random_model(tmp_path_factory.mktemp("tiny") / "qwen2", arch="qwen2", layers=2, tie=True)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    """gemma3_text from a real config's features (random_model.FAMILY): 6 layers, the last one global."""
    return make_random_model(tmp_path_factory.mktemp("tiny") / "gemma3", arch="gemma3_text", layers=6, tie=True)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    """phi3: fused qkv_proj and gate_up_proj, untied head. The folder's name becomes the GGUF's general.name, and
    llama.cpp looks up Phi-3's own <|end|> token for a model named phi3, which the SmolLM2 tokenizer lacks."""
    return make_random_model(tmp_path_factory.mktemp("tiny") / "fused", arch="phi3", layers=2, tie=False)


@pytest.fixture(scope="session")
def calib_text() -> str:
    """Real text: the WikiText-2 validation split shipped in tools/data."""
    return str(WIKITEXT)


@pytest.fixture
def cli(capsys):
    """Run `lrdeploy ARGS` in-process; returns (exit code, stdout, stderr)."""
    from lrdeploy.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        old = sys.argv
        sys.argv = ["lrdeploy", *map(str, args)]
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = old
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def smol_artifact(tmp_path_factory, calib_text) -> Path:
    """SmolLM2-135M compressed with the default method and target (caldera, q2_k, gguf), kept cheap for CI."""
    from lrdeploy.compressor.driver import CompressOptions, compress
    from lrdeploy.compressor.sources import open_source

    out = tmp_path_factory.mktemp("smol") / "caldera"
    opts = CompressOptions(calib=calib_text, calib_range="0:0.5", calib_tokens=2048, seq_len=256, iters=1,
                           lplr_iters=1, device="cpu")
    compress(open_source("smollm2"), opts, out)
    return out
