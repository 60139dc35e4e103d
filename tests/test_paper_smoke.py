"""The paper-size smoke path (bench/bench_paper_smoke.py, issue 17 item 5) at its ``mid`` sizes:
real Snakemake on config/recipes/paper.yaml + the bench's overlay, local random-init SigLIP /
Qwen2 checkpoints and a LLaVA-format dataset; stage1 from the feature cache, then the recipe's
LoRA stage. Also bench/bench_gpu.py without a GPU and its MFU arithmetic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

import bench_paper_smoke  # noqa: E402
from paper_size import MID_LM, MID_VISION, bf16_peak, mfu  # noqa: E402

pytestmark = pytest.mark.slow  # real Snakemake: 7 jobs, each its own Python process


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("paper_smoke")
    args = bench_paper_smoke.parse_args(["--sizes", "mid", "--images", "8"])
    report = bench_paper_smoke.run_smoke(work, args)
    return report, work


def test_stages_ran_from_the_cache_with_finite_losses(smoke) -> None:
    report, _ = smoke
    s1, lora = report["stages"]["stage1"], report["stages"]["ft_lora"]
    assert s1["steps"] == 3 and lora["steps"] == 2
    # both stages freeze the encoder: they read the features of the one cache job
    assert s1["feature_cache"] and s1["feature_cache"] == lora["feature_cache"]
    assert [k for k in report["jobs"] if k.startswith("features/")] == [
        "features/" + Path(s1["feature_cache"]).name
    ]
    for s in (s1, lora):
        assert all(math.isfinite(x) for x in s["losses"]) and math.isfinite(s["heldout_loss"])
        assert s["job_peak_rss_mib"] > 0 and s["step_seconds_median"] > 0
    assert s1["losses"][-1] < s1["losses"][0]  # the projector learns
    # 112 px / patch 14 → 64 image tokens: the overlay's vision checkpoint reached the run
    assert s1["image_tokens"] == (MID_VISION["image_size"] // MID_VISION["patch_size"]) ** 2


def test_the_recipe_lora_reached_the_trained_model(smoke) -> None:
    from vlalign.eval.job import load_stage

    report, _ = smoke
    s1, lora = report["stages"]["stage1"], report["stages"]["ft_lora"]
    assert lora["peft"] == ["lora"]
    loaded = load_stage(lora["dir"], device="cpu")
    (method,) = loaded.session.methods
    adapted = method.adapted_modules()
    # paper.yaml ft_lora: r 16, alpha 32 on q, k, v of every LM layer (seed 003 B.5)
    n_layers = MID_LM["num_hidden_layers"]
    assert len(adapted) == 3 * n_layers
    assert {a.rsplit(".", 1)[-1] for a in adapted} == {"q_proj", "k_proj", "v_proj"}
    lm = loaded.model.lm
    layers = [lm.get_submodule(a) for a in adapted]
    assert all(m.r["lora"] == 16 and m.scaling["lora"] == 2.0 for m in layers)
    # peft starts B at zero: trained B is not
    assert all(m.lora_B["lora"].weight.abs().max() > 0 for m in layers)
    # the LM keeps Qwen's vocabulary (151,936 rows) though the tokenizer is small
    assert lm.get_input_embeddings().num_embeddings == MID_LM["vocab_size"]
    # the LoRA stage trained nothing but LoRA: its saved base LM (methods apart) is stage1's
    from vlalign.models.vlm import VisionLanguageModel

    before = VisionLanguageModel.from_pretrained(Path(s1["dir"]) / "model").state_dict()
    after = VisionLanguageModel.from_pretrained(Path(lora["dir"]) / "model").state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_results_file_has_versions_and_params(smoke) -> None:
    import transformers

    report, _ = smoke
    assert report["model"]["params"]["lm"] > MID_LM["vocab_size"] * MID_LM["hidden_size"]
    assert report["machine"]["transformers"] == transformers.__version__
    assert report["machine"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["overlay"]["runs"]["paper_smoke"]["chain"][1]["stage"] == "ft_lora"
    # the exact peak of the largest job holds at least the LM it trained
    sampled = report["stages"]["stage1"]["job_peak_rss_mib"]
    assert report["largest_job_peak_rss_mib"] >= 0.5 * sampled
    json.dumps(report)  # JSON-able as written


def run_bench_gpu(*args: str, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """``bench/bench_gpu.py args`` as its docstring runs it (src on the path, offline)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_gpu.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_gpu_exits_cleanly_without_a_gpu() -> None:
    proc = run_bench_gpu(timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_mfu_arithmetic_and_device_peaks() -> None:
    assert bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak("NVIDIA H200") == 989e12
    assert bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak("NVIDIA L40S") == 362e12
    assert bf16_peak("Some Future GPU") is None
    # 0.9 B parameters at 75,000 tokens/s on an H100: 6 · 0.9e9 · 7.5e4 / 989e12 = 40.9 %
    assert mfu(900_000_000, 75_000, 989e12) == pytest.approx(0.40950, abs=1e-4)
    assert mfu(900_000_000, 75_000, None) is None


def test_bench_gpu_code_path_on_cpu(tmp_path: Path) -> None:
    """The benchmark's measuring path (``--device cpu --sizes mid``): padded and packed stage2
    train the same samples to the same losses (packing changes the layout, not the maths), every
    step's data wait is recorded, and only the cached stage1 reads the feature cache."""
    out = tmp_path / "gpu_cpu.json"
    args = ["--device", "cpu", "--sizes", "mid", "--steps", "2", "--skip", "0", "--batch", "4",
            "--micro", "2", "--variant", "recipe", "--out", str(out)]  # fmt: skip
    proc = run_bench_gpu(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["stage2"]) == ["recipe"]  # only the variant asked for
    padded, packed = report["stage2"]["recipe"]["padded"], report["stage2"]["recipe"]["packed"]
    assert len(padded["losses"]) == len(packed["losses"]) == 2
    assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-4)
    assert packed["settings"]["packing"] and not padded["settings"]["packing"]
    for s in (padded, packed):
        assert s["mfu"] is None and s["peak_memory_gib"] is None  # no GPU: nothing made up
        assert len(s["data_wait_seconds"]) == 2 and 0 < s["data_wait_fraction"] < 1
        assert s["steps_timed"] == 2 and s["samples_per_s"] > 0
    stage1 = report["stage1"]
    assert stage1["cached"]["feature_cache"] and not stage1["images"]["feature_cache"]
    assert stage1["speedup_cached"] > 0 and "MFU not reported" in report["mfu_note"]
