"""A small learnable dataset for loop tests: each sequence is an arithmetic progression modulo the vocab."""
import torch


class ProgressionDataset(torch.utils.data.Dataset):
    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size, (num_samples, 1), generator=g)
        step = torch.randint(1, 5, (num_samples, 1), generator=g)
        self.data = (start + step * torch.arange(seq_length + 1)) % vocab_size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        seq = self.data[i]
        n = len(seq) - 1
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": torch.ones(n), "position_ids": torch.arange(n)}


def progression_datasets(ctx):
    seq, vocab = ctx.batch.seq_length, ctx.preset.vocab_size
    return ProgressionDataset(256, seq, vocab, seed=0), ProgressionDataset(16, seq, vocab, seed=1), None
