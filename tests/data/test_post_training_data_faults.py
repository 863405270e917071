"""Issue 12 items 13 and 18 at the CLI: a prefix of the wrong mode (a preference prefix as --sft-data, an SFT prefix
as --preference-data) or an empty SFT prefix ends the stage with one `error:` line naming the prefix and exit 2 —
not a run on a misread layout, a numpy reshape error or `cannot mmap an empty file`. In-process, one process (each
stage's `main(argv)`, what `python -m tinyllm_mcore.<stage>` runs)."""
import json

import pytest

from tests.harness.text_data import tiny_tokenizer_dir
from tinyllm_mcore.stages import dpo, pretrain, sft
from tinyllm_mcore.data.preprocess import preprocess


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import numpy as np

    root = tmp_path_factory.mktemp("prefixes")
    tok = str(tiny_tokenizer_dir())
    pairs = [{"prompt": f"问题{i}", "chosen": f"好的回答{i}", "rejected": f"坏{i}"} for i in range(8)]
    chats = [{"question": f"问题{i}", "answer": f"回答{i}"} for i in range(8)]
    empty = IndexedDatasetBuilder(str(root / "empty_sft_document.bin"), dtype=np.uint16)
    empty.finalize(str(root / "empty_sft_document.idx"))
    return {"preference": preprocess(write_jsonl(root / "p.jsonl", pairs), str(root / "p"), tok, mode="preference",
                                     progress=False).prefixes[0],
            "sft": preprocess(write_jsonl(root / "s.jsonl", chats), str(root / "s"), tok, mode="sft",
                              progress=False).prefixes[0],
            "empty": str(root / "empty_sft_document"),
            "checkpoint": initial_checkpoint(root / "init")}


def initial_checkpoint(save):
    """Initialised tiny weights (DPO needs a starting checkpoint)."""
    assert pretrain.main(["--model-size", "tiny", "--tokenizer-model", str(tiny_tokenizer_dir()), "--mock-data",
                          "--seq-length", "64", "--train-iters", "0", "--save", str(save)]) == 0
    return str(save)


def run_stage(stage, data_flag, prefix, tmp_path, capsys, *extra):
    argv = ["--model-size", "tiny", "--tokenizer-model", str(tiny_tokenizer_dir()), data_flag, prefix,
            "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "2", "--save", str(tmp_path / "ckpt"),
            *extra]
    capsys.readouterr()
    rc = stage.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert prefix in errors[0], errors
    return errors[0]


def test_wrong_mode_and_empty_prefixes_are_one_line(prefixes, tmp_path, capsys):
    line = run_stage(sft, "--sft-data", prefixes["preference"], tmp_path, capsys)
    assert "preference" in line and "sft" in line, line
    line = run_stage(dpo, "--preference-data", prefixes["sft"], tmp_path, capsys,
                     "--load", prefixes["checkpoint"], "--finetune")
    assert "sft" in line and "preference" in line, line
    line = run_stage(sft, "--sft-data", prefixes["empty"], tmp_path, capsys)
    assert "empty dataset" in line, line


def mixed_stage_error(stage, argv, capsys) -> str:
    capsys.readouterr()
    rc = stage.main(["--tokenizer-model", str(tiny_tokenizer_dir()), "--seq-length", "64", "--micro-batch-size", "2",
                     "--train-iters", "2", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_checkpoints_of_another_stage_or_size_are_one_line(prefixes, tmp_path, capsys):
    """Issue 12 item 16: stage mixing used to end in KeyError / 'Global shape mismatch' dumps from the loader."""
    from tinyllm_mcore.stages import reward

    lm = prefixes["checkpoint"]
    # a reward model resumed (--load) from an LM checkpoint: it has no reward head
    message = mixed_stage_error(reward, ["--model-size", "tiny", "--preference-data", prefixes["preference"],
                                               "--load", lm], capsys)
    assert "has no reward_head.weight" in message and lm in message
    # a real reward checkpoint, then SFT --load of it: it has no LM head
    reward_ckpt = str(tmp_path / "reward")
    assert reward.main(["--model-size", "tiny", "--tokenizer-model", str(tiny_tokenizer_dir()), "--seq-length", "64",
                        "--micro-batch-size", "2", "--train-iters", "1", "--preference-data", prefixes["preference"],
                        "--init-from", lm, "--save", reward_ckpt]) == 0
    message = mixed_stage_error(sft, ["--model-size", "tiny", "--sft-data", prefixes["sft"], "--load",
                                            reward_ckpt, "--finetune"], capsys)
    assert "has no output_layer.weight" in message
    # DPO of another --model-size than its checkpoint
    message = mixed_stage_error(dpo, ["--model-size", "16m", "--preference-data", prefixes["preference"],
                                            "--load", lm, "--finetune"], capsys)
    assert "is a tiny model and this run builds 16m" in message and "--model-size tiny" in message
