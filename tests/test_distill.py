"""Feature distillation (--refine distill) and rank allocation to a budget, on tiny random models."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from interrupt import signal_after_first_block

from lrdeploy.artifact import load_artifact, read_manifest
from lrdeploy.compressor import allocate as alloc
from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import distill as dst
from lrdeploy.compressor.arch import LLAMA
from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.model import BlockContext
from lrdeploy.compressor.sources import open_source

FAST = ["--calib-tokens", "512", "--seq-len", "64", "--calib-range", "0:0.1", "-q", "--device", "cpu"]


def test_loss_matches_hand_computed_values():
    # token 1: |y - ŷ| = (1, 1) -> 1; cos = 0 -> -log σ(0) = log 2
    # token 2: ŷ = y -> 0; cos = 1 -> -log σ(1) = log(1 + e^-1)
    y = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    y_hat = torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    expected = ((1 + math.log(2)) + math.log(1 + math.exp(-1))) / 2
    assert float(dst.distill_loss(y, y_hat)) == pytest.approx(expected, rel=1e-6)
    # opposite directions, scaled: |(2, -4) - (-1, 2)| = (3, 6) -> 4.5; cos = -1 -> -log σ(-1) = log(1 + e)
    a, b = torch.tensor([[2.0, -4.0]]), torch.tensor([[-1.0, 2.0]])
    assert float(dst.distill_loss(a, b)) == pytest.approx(4.5 + math.log(1 + math.e), rel=1e-6)
    # batch and sequence dims are just more tokens
    assert float(dst.distill_loss(y[None], y_hat[None])) == pytest.approx(expected, rel=1e-6)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def _state(module: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in module.state_dict().items()}


def test_training_one_block_leaves_teacher_and_other_blocks_identical(tiny_llama):
    teacher = _model(tiny_llama)
    torch.manual_seed(0)
    x = torch.randn(4, 16, 256, requires_grad=True)
    students = []
    for block in teacher.model.layers:
        factors = {}
        for name in LLAMA.linears:
            W = block.get_submodule(name).weight.detach()
            L, R = dec.svd_lowrank(W, 32)
            factors[name] = (None, L, R, None)
        students.append(dst.trainable_block(block, factors))
    teacher_before = _state(teacher)
    others_before = _state(students[0])
    target = students[1]
    trained_before = _state(target)

    ctx = BlockContext(teacher, x, teacher.model.rotary_emb)[1]
    with torch.no_grad():
        y = teacher.model.layers[1](x, **ctx)
    history = dst.train_block(target, [x, x * 1.01], y, ctx, steps=3, lr=1e-3, batch=2, seed=0)

    assert len(history) == 3 and all(math.isfinite(h) for h in history)
    assert _state(teacher) == teacher_before
    assert _state(students[0]) == others_before
    after = _state(target)
    changed = {k for k in after if after[k] != trained_before[k]}
    assert changed and all(k.endswith((".L", ".R")) for k in changed)  # norms and everything else frozen
    assert x.grad is None  # no gradient leaves the block
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_lowrank_artifact_records_losses(tiny_llama, calib_text, tmp_path, cli):
    out = tmp_path / "d"
    code, _, err = cli("compress", tiny_llama, "-o", out, "--method", "lowrank", "--rank", "32", "--refine", "distill",
                       "--distill-steps", "6", "--distill-lr", "1e-3", "--calib", calib_text, *FAST)
    assert code == 0, err
    m = read_manifest(out)
    d = m["distill"]
    assert d["inputs"] == "teacher+student" and [b["layer"] for b in d["blocks"]] == [0, 1]
    for b in d["blocks"]:
        assert set(b["loss_before"]) == {"teacher", "student"}
        assert b["kept"] and b["loss_after"]["teacher"] < b["loss_before"]["teacher"]
    assert all("error_init" in e for e in m["linears"].values())
    model, _ = load_artifact(out)
    assert torch.isfinite(model(torch.randint(0, 1000, (1, 8))).logits).all()
    # the embeddings and norms are untouched by training
    src = open_source(str(tiny_llama))
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert torch.equal(model.get_parameter(norm), src.tensor(norm))


def test_distill_keeps_initial_factors_when_training_makes_a_block_worse(tiny_llama, calib_text, tmp_path, cli):
    """A learning rate far too hot wrecks every block; each then keeps its initial L and R, bit for bit."""
    common = ["--method", "lowrank", "--rank", "32", "--calib", calib_text, *FAST]
    code, _, err = cli("compress", tiny_llama, "-o", tmp_path / "plain", *common)
    assert code == 0, err
    code, _, err = cli("compress", tiny_llama, "-o", tmp_path / "hot", *common, "--refine", "distill",
                       "--distill-steps", "3", "--distill-lr", "10")
    assert code == 0, err
    blocks = read_manifest(tmp_path / "hot")["distill"]["blocks"]
    assert blocks and not any(b["kept"] for b in blocks)
    assert all(sum(b["loss_after"].values()) >= sum(b["loss_before"].values()) for b in blocks)
    assert _tensors_bytes(tmp_path / "hot") == _tensors_bytes(tmp_path / "plain")


def _tensors_bytes(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_distill_resumes_after_sigkill(tmp_path, calib_text):
    """Kill a real distillation run after its first finished block; --resume gives the same bytes and records."""
    from random_model import make_random_model

    model = make_random_model(tmp_path / "m", layers=3)
    args = ["compress", str(model), "--method", "lowrank", "--rank", "32", "--refine", "distill", "--distill-steps",
            "4", "--target", "any", "--calib", calib_text, *FAST]
    exe = [sys.executable, "-m", "lrdeploy.cli"]
    subprocess.run(exe + args + ["-o", str(tmp_path / "full")], check=True, capture_output=True)

    out = tmp_path / "killed"
    signal_after_first_block(exe + args + ["-o", str(out)], out, signal.SIGKILL).wait()
    state = out.with_name("killed.partial") / "state.json"
    assert 1 <= json.loads(state.read_text())["layers_done"] < 3 and not out.exists()
    subprocess.run(exe + args + ["-o", str(out), "--resume"], check=True, capture_output=True)
    assert _tensors_bytes(out) == _tensors_bytes(tmp_path / "full")
    full, resumed = read_manifest(tmp_path / "full"), read_manifest(out)
    assert [b["layer"] for b in resumed["distill"]["blocks"]] == [0, 1, 2]
    strip = [{k: v for k, v in b.items() if k != "seconds"} for b in full["distill"]["blocks"]]
    assert [{k: v for k, v in b.items() if k != "seconds"} for b in resumed["distill"]["blocks"]] == strip


def _slots() -> list[alloc.Slot]:
    shapes = [(256, 256), (128, 256), (512, 256), (256, 512)]
    return [alloc.Slot(f"model.layers.{i}.l{j}", i, shp, 0.0, float(sum(shp)), 8)
            for i in range(4) for j, shp in enumerate(shapes)]


@pytest.mark.parametrize("mode", ["uniform", "bottom", "top", "error"])
def test_allocation_hits_budget(mode):
    slots = _slots()
    full = sum(s.shape[0] * s.shape[1] for s in slots)
    budget = 0.45 * full
    torch.manual_seed(0)
    curves = {s.name: alloc.error_curve(torch.rand(min(s.shape)).sort(descending=True).values) for s in slots}
    ranks = alloc.allocate(slots, budget, mode, curves)
    cost = alloc.total_cost(slots, ranks)
    biggest_step = max(s.per_rank * s.step for s in slots)
    assert budget - biggest_step * (len(slots) if mode == "uniform" else 1) <= cost <= budget
    assert all(s.step <= ranks[s.name] <= s.max_rank and ranks[s.name] % s.step == 0 for s in slots)
    first = sum(r for k, r in ranks.items() if ".0." in k)
    last = sum(r for k, r in ranks.items() if ".3." in k)
    if mode == "bottom":
        assert first < last
    if mode == "top":
        assert first > last


def test_allocation_refuses_impossible_budget():
    from lrdeploy.errors import LrdError

    with pytest.raises(LrdError, match="smaller reduction"):
        alloc.allocate(_slots(), 10.0, "uniform")


def test_error_allocation_no_worse_than_uniform(tiny_llama, calib_text, tmp_path):
    """At one parameter budget, greedy on measured H-error beats (or ties) the same fraction of rank everywhere."""
    src = open_source(str(tiny_llama))
    base = dict(method="lowrank", target_params=5.0, inputs="teacher", calib=calib_text, calib_range="0:0.1",
                calib_tokens=512, seq_len=64, device="cpu")
    total, cost = {}, {}
    for mode in ("uniform", "error"):
        m = compress(src, CompressOptions(allocation=mode, **base), tmp_path / mode).manifest
        a = m["allocation"]
        assert a["mode"] == mode and 5.0 <= a["param_reduction"] < 5.5
        assert all(m["linears"][k]["rank"] == r for k, r in a["ranks"].items())
        total[mode] = sum(e["error"] for e in m["linears"].values())
        cost[mode] = a["cost"]
    assert total["error"] <= total["uniform"] * 1.001
    assert cost["error"] <= a["budget"] and cost["uniform"] <= a["budget"]


def test_caldera_distill_with_bpw_target(calib_text, tmp_path, cli):
    from random_model import make_random_model

    one_block = make_random_model(tmp_path / "m", layers=1)  # LDLQ is the slow part: one block is enough
    out = tmp_path / "c"
    code, _, err = cli("compress", one_block, "-o", out, "--method", "caldera", "--target-bpw", "4.5",
                       "--refine", "distill", "--distill-steps", "3", "--distill-inputs", "student", "--iters", "1",
                       "--lplr-iters", "1", "--preset", "source", "--calib", calib_text, *FAST)
    assert code == 0, err
    m = read_manifest(out)
    assert 4.0 < m["allocation"]["bpw"] <= 4.5 and m["summary"]["bpw"] == pytest.approx(m["allocation"]["bpw"])
    assert all(e["rank"] % 32 == 0 and e["q_format"] == "q2_k" for e in m["linears"].values())
    assert set(m["distill"]["blocks"][0]["loss_after"]) == {"student"}
    model, _ = load_artifact(out)
    q = model.model.layers[0].self_attn.q_proj
    assert q.q is not None and q.rank > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--refine", "distill", "--method", "ldlq"], "needs --method lowrank or caldera"),
        (["--refine", "polish"], "unknown --refine 'polish'"),
        (["--refine", "distill", "--distill-inputs", "both"], "unknown --distill-inputs 'both'"),
        (["--method", "lowrank", "--target-params", "20", "--rank", "32"], "exclude each other"),
        (["--target-params", "20"], "needs --method lowrank"),
        (["--method", "lowrank", "--target-params", "120"], "between 0 and 100"),
        (["--allocation", "error"], "needs a size target"),
        (["--method", "lowrank", "--target-bpw", "4", "--allocation", "middle"], "unknown --allocation 'middle'"),
        (["--method", "lowrank", "--target-params", "99"], "smaller reduction"),
    ],
)
def test_bad_distill_options_one_line_error(tiny_llama, calib_text, tmp_path, cli, args, message):
    code, _, err = cli("compress", tiny_llama, "-o", tmp_path / "o", "--calib", calib_text, *FAST, *args)
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
