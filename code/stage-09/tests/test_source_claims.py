"""docs/SOURCES.md: its table is what source_claims.py computes, and its verdicts hold."""
import os

import pytest

import source_claims as sc
from accounting import compare_peft_methods, estimate_finetune_memory, llama_parameter_count


def test_sources_md_table_is_generated():
    with open(sc.SOURCES_MD) as f:
        text = f.read()
    block = text[text.index(sc.BEGIN):text.index(sc.END) + len(sc.END)]
    assert block == sc.render(), "docs/SOURCES.md is stale: run python code/stage-09/source_claims.py --write"


def test_every_claim_has_a_status_and_a_source():
    for row in sc.claims():
        assert row["source"] and row["status"], row
        assert row["status"].split()[0].rstrip(";:") in {
            "recomputed", "reproduced", "cited", "unsourced", "wrong", "not"}, row


# ---- the verdicts, asserted from the calculators -----------------------------------
def test_7b_memory_claims_of_the_overview_are_wrong():
    full = estimate_finetune_memory(7e9, "full", "fp32")
    assert full["weights"] == pytest.approx(28e9) and full["total"] > 3 * 28e9   # ~28 GB is weights only
    lora = compare_peft_methods()["lora"]["params"]
    assert estimate_finetune_memory(7e9, "lora", "fp16", trainable_params=lora)["total"] > 8e9
    assert estimate_finetune_memory(7e9, "lora", "int8", trainable_params=lora)["total"] < 8e9
    prompt = compare_peft_methods()["prompt_tuning"]["params"]
    for dtype in ("fp16", "int8", "int4"):                  # prompt tuning's ~2 GB: no precision fits
        assert estimate_finetune_memory(7e9, "prompt", dtype, trainable_params=prompt)["total"] > 2e9


def test_course_full_row_is_a_third_of_llama_7b():
    share = compare_peft_methods()["full_fine_tuning"]["params"] / llama_parameter_count()["total"]
    assert 0.3 < share < 0.35


def test_peft_on_175b_share_is_a_thousandth_of_a_percent():
    assert 1.75e6 / 175e9 == pytest.approx(1e-5)           # 0.001%, not the 0.01% claimed


def test_70b_qlora_does_not_fit_24_gb_but_65b_fits_48_gb():
    bits = sc.nf4_bits_per_parameter()
    assert 70e9 * bits / 8 > 24e9
    llama65 = llama_parameter_count(8192, 80, 22016)
    lora = sc.lora_all_linear_params(8192, 80, 22016, 64)
    total = ((llama65["attention"] + llama65["mlp"]) * bits / 8
             + (llama65["embeddings"] + llama65["norms"]) * 2 + lora * 12)
    assert total < 48e9


def test_lora_gpt3_ten_thousand_times_fewer():
    lora = compare_peft_methods(lora_rank=4, **sc.GPT3_SHAPE)["lora"]["params"]
    assert 0.9e4 < 175e9 / lora < 1.1e4


def test_published_model_sizes_from_their_architectures():
    """BERT-base/large and GPT-2 Medium as released (Hugging Face's parameter counts)."""
    assert sc.bert_parameter_count(768, 12)["total"] == 109_482_240
    assert sc.bert_parameter_count(1024, 24)["total"] == 335_141_888
    assert sc.gpt2_parameter_count(1024, 24) == 354_823_168


def test_houlsby_share_brackets_three_point_six_percent():
    bert = sc.bert_parameter_count(1024, 24)["total"]
    assert sc.houlsby_adapter_params(1024, 24, 64) / bert < 0.036 < \
        sc.houlsby_adapter_params(1024, 24, 256) / bert


def test_double_quantization_bits_match_qlora():
    """QLoRA §3: constants cost 32/64 = 0.5 bits per weight, 0.127 with double quantization."""
    assert sc.nf4_bits_per_parameter(False) == pytest.approx(4.5)
    assert sc.nf4_bits_per_parameter(True) - 4 == pytest.approx(0.127, abs=5e-4)


def test_measured_claims_read_the_committed_results():
    for path in ("results/qat/runs.csv", "results/alpha_r/runs.csv"):
        assert os.path.exists(os.path.join(sc.ROOT, path)), path
    assert sc._qat_result()[1] == "reproduced"
    assert sc._alpha_result()[1] == "reproduced"
