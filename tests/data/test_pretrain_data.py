"""Pretraining datasets: megatron-core GPTDataset / BlendedDataset / MockGPTDataset over our indexed files."""
import multiprocessing
import socket
from collections import Counter

import pytest
import torch

from tests.harness.text_data import tiny_tokenizer, tiny_tokenizer_dir, write_text_jsonl
from tinyllm_mcore.data.preprocess import preprocess
from tinyllm_mcore.data.pretrain import build_pretrain_datasets

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two preprocessed corpora (with eod) and their documents as token tuples."""
    root = tmp_path_factory.mktemp("pretrain")
    tok = tiny_tokenizer()
    out = {}
    for name, n, seed in (("a", 300, 11), ("b", 200, 12)):
        texts = write_text_jsonl(root / f"{name}.jsonl", n, seed=seed)
        result = preprocess(str(root / f"{name}.jsonl"), str(root / name), str(tiny_tokenizer_dir()),
                            append_eod=True, progress=False)
        out[name] = (result.prefixes[0], [tuple(tok.tokenize(t) + [tok.eod]) for t in texts])
    return out


def assert_window_of_documents(window, docs, eod):
    """``window`` must be: the tail of a document, whole documents, the head of a document (split at eod)."""
    pieces, start = [], 0
    for i, token in enumerate(window):
        if token == eod:
            pieces.append(tuple(window[start:i + 1]))
            start = i + 1
    pieces.append(tuple(window[start:]))
    doc_set = set(docs)
    if len(pieces) == 1:
        assert any(_contains(d, pieces[0]) for d in docs), "window is not inside any document"
        return
    assert any(d[-len(pieces[0]):] == pieces[0] for d in docs), "first piece is no document's tail"
    assert all(p in doc_set for p in pieces[1:-1]), "middle piece is not a whole document"
    assert not pieces[-1] or any(d[:len(pieces[-1])] == pieces[-1] for d in docs), "last piece is no document's head"


def _contains(doc, piece):
    n = len(piece)
    return any(doc[i:i + n] == piece for i in range(len(doc) - n + 1))


def test_gpt_dataset_samples_are_windows_of_the_written_documents(corpus):
    prefix, docs = corpus["a"]
    tok = tiny_tokenizer()
    train, valid, test = build_pretrain_datasets([prefix], "90,10,0", SEQ, 1234, tok, (50, 5, 0))
    assert type(train).__name__ == "GPTDataset" and test is None and len(valid) >= 5
    for idx in range(len(train)):
        sample = train[idx]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(v.shape == (SEQ,) for v in sample.values())
        assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert_window_of_documents(sample["tokens"].tolist() + sample["labels"][-1:].tolist(), docs, tok.eod)


def test_blend_weights_follow_megatron_syntax(corpus):
    (prefix_a, _), (prefix_b, _) = corpus["a"], corpus["b"]
    train, valid, _ = build_pretrain_datasets(["0.25", prefix_a, "0.75", prefix_b], "969,30,1", SEQ, 7,
                                              tiny_tokenizer(), (400, 20, 0))
    assert type(train).__name__ == "BlendedDataset" and len(train) == 400
    counts = Counter(int(train[i]["dataset_id"]) for i in range(len(train)))
    assert counts[0] == pytest.approx(100, abs=5) and counts[1] == pytest.approx(300, abs=5)


def test_missing_prefix_is_a_clear_error(corpus, tmp_path):
    missing = str(tmp_path / "nothing_text_document")
    with pytest.raises(FileNotFoundError, match="nothing_text_document"):
        build_pretrain_datasets(["1", corpus["a"][0], "1", missing], "1,0,0", SEQ, 1, tiny_tokenizer(), (10, 0, 0))
    with pytest.raises(ValueError, match="test split is empty"):  # megatron-core would loop forever
        build_pretrain_datasets([corpus["b"][0]], "969,30,1", SEQ, 1, tiny_tokenizer(), (10, 2, 2))
    with pytest.raises(ValueError, match="data-path"):
        build_pretrain_datasets(None, "1,0,0", SEQ, 1, tiny_tokenizer(), (10, 0, 0))


def test_mock_datasets():
    tok = tiny_tokenizer()
    train, valid, test = build_pretrain_datasets(None, "969,30,1", SEQ, 1, tok, (16, 4, 2), mock=True)
    assert type(train).__name__ == "MockGPTDataset" and len(train) >= 16
    sample = train[3]
    assert sample["tokens"].shape == (SEQ,) and int(sample["tokens"].max()) < tok.vocab_size


def _build_on_rank(rank, port, prefix, cache_dir, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train, _, _ = build_pretrain_datasets([prefix], "1,0,0", SEQ, 3, tiny_tokenizer(), (20, 0, 0),
                                              cache_dir=cache_dir)
        results.put((rank, train[5]["tokens"].tolist()))
    finally:
        dist.destroy_process_group()


def test_builds_under_torch_distributed_with_shared_cache(corpus, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_build_on_rank, args=(r, port, corpus["a"][0], str(tmp_path), results))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = dict(results.get(timeout=5) for _ in range(2))
    assert got[0] == got[1]
    assert list(tmp_path.rglob("*.npy")), "rank 0 cached the indices"
    # Without torch.distributed, the same call reads the cache and gives the same sample.
    train, _, _ = build_pretrain_datasets([corpus["a"][0]], "1,0,0", SEQ, 3, tiny_tokenizer(), (20, 0, 0),
                                          cache_dir=str(tmp_path))
    assert train[5]["tokens"].tolist() == got[0]
