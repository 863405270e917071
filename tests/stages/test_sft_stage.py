"""SFT: the stage teaches a tiny model to answer the corpus' questions in the chat format, which the initial
(pretrained-stand-in) checkpoint cannot; the loss is on assistant tokens only."""

from tests.harness import post_training_data as data


def test_sft_teaches_facts_in_chat_format():
    checkpoints = data.checkpoints()
    corpus = data.corpus()
    trained = corpus.sft[:48]
    heldout = [r for r in corpus.eval if r["split"] == "heldout_phrasing"]
    init_trained, init_heldout = data.exact_match_rate(checkpoints["init"], trained), \
        data.exact_match_rate(checkpoints["init"], heldout)
    sft_trained, sft_heldout = data.exact_match_rate(checkpoints["sft"], trained), \
        data.exact_match_rate(checkpoints["sft"], heldout)
    print(f"exact match: trained phrasings {init_trained:.2f} -> {sft_trained:.2f}, "
          f"held-out phrasings {init_heldout:.2f} -> {sft_heldout:.2f}")
    assert init_trained == 0 and init_heldout == 0
    # each question is taught in two answer styles, so a fixed budget gives each style half the repetitions (the
    # quickstart's longer SFT reaches 100%; its e2e test asserts that)
    assert sft_trained >= 0.7
    # Held-out phrasings: the tiny model generalises only partly (see the report: the 90% target is not met).
    assert sft_heldout > 0.15


def test_sft_loss_only_on_assistant_tokens():
    tok = data.tokenizer()
    sample = data.sft_dataset(data.corpus().sft[:1])[0]
    trained_ids = [int(t) for t, m in zip(sample["labels"], sample["loss_mask"]) if m > 0]
    answer = data.corpus().sft[0]["answer"]
    assert tok.detokenize(trained_ids[:-1]) == answer and trained_ids[-1] == tok.eos


def test_sft_cli_errors(tmp_path, capsys):
    from tinyllm_mcore.stages import sft
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import run_stage

    flags = data.common_flags(tmp_path, "--train-iters", "1", "--micro-batch-size", "1")
    try:
        assert sft.main(flags) == 2  # no --sft-data: one error line
        assert capsys.readouterr().err.strip().splitlines() == ["error: give --sft-data FILE.jsonl or indexed PREFIX"]
        rt.destroy()
        assert run_stage(sft.make_stage(data.sft_provider(data.corpus().sft[:2])),
                         flags + ["--load", str(tmp_path / "missing"), "--finetune"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: ") and "missing" in error[0], error
    finally:
        rt.destroy()  # the loop's main leaves the runtime up after an error
