"""Dataset components for the recipes' data checks (``tad_torchtune.data.checks``): rows as
torchtune's SFT datasets make them, of a chosen length and largest id, and builders that fail as
another package's datasets do."""

from torch.utils.data import Dataset


class Rows(Dataset):
    """``n`` samples ``{"tokens", "labels"}`` of ``length`` ids each, the last one ``top_id``;
    ``fail``: the first sample raises what a dataset missing a column raises."""

    def __init__(self, tokenizer, *, length: int, top_id: int = 5, n: int = 64,
                 fail: bool = False) -> None:
        self.length, self.top_id, self.n, self.fail = length, top_id, n, fail

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if self.fail:
            raise KeyError("prompt")
        tokens = [2 + (index + j) % 3 for j in range(self.length - 1)] + [self.top_id]
        return {"tokens": tokens, "labels": list(tokens)}


def rows(tokenizer, *, length: int, top_id: int = 5, n: int = 64, fail: bool = False,
         **token_store_keys) -> Rows:
    """``Rows``; the keys of the token store's dataset that a test config leaves beside the
    swapped ``_component_`` are ignored."""
    return Rows(tokenizer, length=length, top_id=top_id, n=n, fail=fail)


def unreadable(tokenizer, **kwargs):
    """A builder whose files do not parse (Hugging Face datasets' DatasetGenerationError)."""
    raise RuntimeError("An error occurred while generating the dataset: line 1 is not JSON")
