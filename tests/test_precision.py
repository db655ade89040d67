"""The precision a run trains in when trainer.precision is null, the attention kernel picked for it, and model.compile=auto:
each chosen by one rule from what the device can do (vit/precision.py, vit.model.sdpa_is_faster, vit.builders.compile_pays)."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from vit import builders, precision, registry, reproduce, run, verdicts
from vit.errors import ConfigError
from vit.model import MultiHeadAttention, ViT, sdpa_is_faster

SMALL = dict(in_channels=3, patch_size=8, emb_size=32, img_size=32, depth=2, n_classes=10, num_heads=4)


def test_the_cpu_default_follows_the_cpus_bf16_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert precision.native_bf16(precision.cpu_flags(cpuinfo)) == "avx512_bf16"
    assert precision.native_bf16({"amx_bf16", "avx2"}) == "amx_bf16"
    assert precision.cpu_flags(tmp_path / "absent") == set()
    assert precision.cpu_default({"avx2", "avx512f"}) == ("32-true", "this CPU has no native bf16 (avx512_bf16 or AMX)")
    monkeypatch.setattr(precision, "bf16_is_right", lambda: True)
    assert precision.cpu_default({"avx512_bf16"})[0] == "bf16-mixed"
    monkeypatch.setattr(precision, "bf16_is_right", lambda: False)
    precision_, why = precision.cpu_default({"avx512_bf16"})
    assert precision_ == "32-true" and "failed the check" in why


def test_an_explicit_precision_wins_and_null_is_said_in_the_log(caplog):
    assert precision.resolve_precision({"precision": "32-true", "accelerator": "cpu"}) == "32-true"
    with caplog.at_level("INFO", logger="vit.precision"):
        chosen = precision.resolve_precision({"precision": None, "accelerator": "cpu"})
    assert chosen == precision.cpu_default()[0] and f"training in {chosen} precision" in caplog.text


def test_this_cpus_bf16_check_compares_with_fp64():
    """The check passes here only if bf16 autocast really gives fp32's results within bf16's rounding; a CPU that
    lacks bf16 instructions still computes bf16 (emulated), so the check is meaningful everywhere."""
    assert precision.bf16_is_right()
    x = torch.randn(64, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrong = torch.nn.functional.linear(x.float(), torch.zeros(64, 64))  # what a broken kernel might give
    assert (wrong.double() - x @ x.T).abs().max() > 0.05  # the check's threshold tells such a result apart


def test_the_attention_kernel_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sdpa_is_faster(cpu, torch.float32, 8) and sdpa_is_faster(cuda, torch.bfloat16, 8)
    assert not sdpa_is_faster(cpu, torch.bfloat16, 8) and not sdpa_is_faster(cpu, torch.float16, 64)
    with pytest.raises(ValueError, match="fused must be true, false or null"):
        MultiHeadAttention(32, 4, fused="yes")


def kernel_used(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> set[str]:
    """Which attention kernels a forward of ``model`` on ``x`` calls (under CPU autocast to ``dtype``)."""
    calls = set()
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.add("sdpa")
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(x)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return calls or {"plain"}


def test_the_default_picks_sdpa_in_fp32_and_plain_in_bf16_and_both_agree_in_bf16():
    torch.manual_seed(0)
    model = ViT(**SMALL).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert kernel_used(model, x, None) == {"sdpa"} and kernel_used(model, x, torch.bfloat16) == {"plain"}
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(x)
            for m in model.modules():
                if isinstance(m, MultiHeadAttention):
                    m.fused = True
            fused = model(x)
    torch.testing.assert_close(plain.float(), fused.float(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(plain.float(), reference, atol=0.1, rtol=0.1)  # bf16's rounding, not another function


def test_a_run_records_the_precision_it_trained_in(make_cfg):
    cfg = make_cfg(["trainer.max_epochs=1", "trainer.precision=bf16-mixed", "test=false"])
    run.train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())["precision"] == "bf16-mixed"


def test_a_convolution_whose_stride_passes_its_input_is_found():
    """torch's CPU bf16 convolution computes wrong weight gradients there (vit.precision.stride_past_input)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 2, 1)).train()
    assert precision.stride_past_input(net, [(3, 4, 4)]) is None  # 4x4 -> 2x2: each stride at most its input
    assert precision.stride_past_input(net, [(3, 4, 4), (3, 2, 2)]) == "2 (stride 2x2 on a 1x1 input at side 2)"
    assert net.training and all(p.grad is None for p in net.parameters())
    assert precision.stride_past_input(ViT(**SMALL), [(3, 32, 32)]) is None  # the patches: stride 8 on 32x32
    assert precision.stride_past_input(torch.nn.Conv2d(3, 8, 1, 2), [(3, 1, 1)]) is None  # a 1x1 kernel computes right


CNN_AT_16 = ["model=timm", "model.name=resnet10t", "data.train_sizes=[16,32]", "model.compile=false"]


def test_a_cnn_whose_stride_passes_its_input_trains_in_fp32_where_bf16_was_chosen(make_cfg, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_default", lambda flags=None: ("bf16-mixed", "this CPU has avx512_bf16"))
    not_the_vit = [o for o in TINY if not o.startswith("model.")]
    with caplog.at_level("INFO", logger="vit.run"):
        _, _, module = run.build_for_fit(make_cfg([*not_the_vit, *CNN_AT_16], tiny=False))
    assert module.hparams["config"]["trainer"]["precision"] == "32-true"
    assert "Training in 32-true precision" in caplog.text and "layer4.0.conv1 (stride 2x2 on a 1x1 input at side 16)" in caplog.text
    assert (
        run.build_for_fit(make_cfg([*not_the_vit, "model=timm", "model.name=resnet10t"], tiny=False))[2].hparams["config"]["trainer"]["precision"]
        == "bf16-mixed"
    )


def test_bf16_asked_for_by_name_on_such_a_cnn_is_refused_in_one_line(make_cfg):
    not_the_vit = [o for o in TINY if not o.startswith("model.")]
    with pytest.raises(ConfigError, match=r"trainer.precision=bf16-mixed: .*layer4.0.conv1.*; set trainer.precision=32-true"):
        run.build_for_fit(make_cfg([*not_the_vit, *CNN_AT_16, "trainer.precision=bf16-mixed"], tiny=False))


def test_compile_auto_compiles_only_where_it_pays(monkeypatch):
    assert builders.compile_pays("bf16-mixed", False, 6000)[0]
    assert builders.compile_pays("32-true", False, 6000) == (False, "a CPU step in 32-true is no faster compiled")
    assert "too few" in builders.compile_pays("bf16-mixed", False, 100)[1]
    assert "not measured" in builders.compile_pays("16-mixed", True, 6000)[1]
    monkeypatch.setattr(builders.shutil, "which", lambda name: None)
    assert builders.compile_pays("bf16-mixed", False, 6000) == (False, "no C++ compiler here for torch.compile on a CPU (install g++ to compile)")
    with pytest.raises(ConfigError, match="model.compile must be true, false or auto"):
        builders.build_net({**SMALL, "_target_": "vit.model.ViT", "compile": "always"})


def test_a_tiny_run_says_why_it_is_not_compiled(make_cfg, caplog):
    with caplog.at_level("INFO", logger="vit.builders"):
        run.build_for_fit(make_cfg(["trainer.precision=bf16-mixed"]))
    assert "model.compile=auto: not compiling" in caplog.text and "too few" in caplog.text


def test_reproduce_reruns_a_row_in_the_precision_it_recorded():
    rows = registry.load_registry()
    seed = rows.row("seed")
    assert seed.precision == "32-true"
    assert reproduce.recorded_precision(seed, []) == "trainer.precision=32-true"
    assert reproduce.recorded_precision(seed, ["trainer.precision=bf16-mixed"]) is None  # the user's choice stands
    assert all(row.precision for row in rows.rows if row.kind == "train")


def test_reproduces_verdict_says_what_the_rerun_trained_in(tmp_path):
    seed = registry.load_registry().row("seed")
    (tmp_path / "run.json").write_text(json.dumps({"precision": "bf16-mixed"}))
    assert verdicts.precision_verdict(seed, tmp_path) == "precision: bf16-mixed, not the row's (32-true)"
    (tmp_path / "run.json").write_text(json.dumps({"precision": "32-true"}))
    assert verdicts.precision_verdict(seed, tmp_path) == "precision: 32-true, the same as the row's (32-true)"
