"""lm-evaluation-harness (a tool nobody here wrote) on the HF export over the same local CMMLU CSVs chooses the same
options as our ppl mode, with the same log-likelihoods; the export's AutoTokenizer gives our tokenizer's ids."""
import os

import pytest

pytest.importorskip("lm_eval")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from tinyllm_mcore.evaluation import multiple_choice as mc  # noqa: E402
from tinyllm_mcore.evaluation.lm_eval_compat import run_lm_eval  # noqa: E402


def compare(hf_dir, bench, subjects, shots, tmp_path, split="test", tokenizer_model=None):
    from tinyllm_mcore.evaluation.encoders import HFEncoder, SentencePieceEncoder
    from tinyllm_mcore.evaluation.runner import open_hf
    from tinyllm_mcore.tokenizer.core import Tokenizer

    tasks = mc.load_tasks(bench, split, shots, subjects)
    # AutoTokenizer on the export (what lm-eval uses) == the project's tokenizer, on every prompt we score
    hf_encoder = HFEncoder.from_pretrained(str(hf_dir))
    ours_encoder = SentencePieceEncoder(Tokenizer.load(tokenizer_model or hf_dir))
    for task in tasks:
        for q in task.data.questions:
            context = mc.ppl_context(task.name_zh, task.shots, q)
            for letter in "ABCD":
                assert mc.encode_pair(hf_encoder, context, " " + letter) == \
                    mc.encode_pair(ours_encoder, context, " " + letter)
    lm, encoder = open_hf(str(hf_dir))
    ours = mc.evaluate_multiple_choice(lm, encoder, tasks)["records"]
    theirs = run_lm_eval(hf_dir, bench, subjects, shots=shots, work_dir=tmp_path / "lm_eval", split=split)
    n = 0
    for subject in subjects:
        assert [r["pred"] for r in ours[subject]] == [r["pred"] for r in theirs[subject]], subject
        for a, b in zip(ours[subject], theirs[subject]):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
            n += 1
    return n


@pytest.mark.distributed  # the export's checkpoint comes from 2 processes (conftest.mcore_export)
def test_lm_eval_agrees_on_the_mcore_export(mcore_export, tmp_path):
    n = compare(mcore_export["hf"], mcore_export["bench"], ["agronomy", "anatomy", "logical"], mcore_export["shots"],
                tmp_path, tokenizer_model=mcore_export["tokenizer"])
    assert n == 30


def test_lm_eval_agrees_on_real_cmmlu_with_the_seed_tokenizer(shared_dir, chatglm3_tokenizer_model, tmp_path):
    """The real CMMLU dev questions (5 per subject) and the seed's ChatGLM3 tokenizer ([gMASK] sop prefix), on a
    random 64798-vocab model: zero-shot and 2-shot (shots from the same dev file)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyllm_mcore.convert.hf_config import hf_config
    from tinyllm_mcore.tokenizer.hf_folder import write_tokenizer_folder
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.tokenizer.core import Tokenizer

    bench = shared_dir / "cmmlu"
    if not (bench / "dev").is_dir():
        pytest.skip("no shared CMMLU dev split")
    tokenizer = Tokenizer.load(chatglm3_tokenizer_model)
    config = hf_config(get_preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=1024))
    config["initializer_range"] = 0.3
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(hf_dir)
    write_tokenizer_folder(tokenizer, hf_dir)
    subjects = ["chinese_history", "college_mathematics"]
    for shots in (0, 2):
        assert compare(hf_dir, bench, subjects, shots, tmp_path / f"k{shots}", split="dev",
                       tokenizer_model=chatglm3_tokenizer_model) == 10
