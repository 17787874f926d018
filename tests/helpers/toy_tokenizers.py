"""Small tokenizers for the data tests, built locally (none downloaded)."""

import json
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes + 3, BOS 1, EOS 2: a tokenizer with no batch engine (goes through workers)."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, vocab_size: int = 259, *, big_id_for: str | None = None) -> None:
        self.vocab_size = vocab_size
        self._big = big_id_for

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        if self._big is not None and self._big in text:
            ids.append(70_000)
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos


def hf_tokenizer(folder: Path, *, template: bool = False, vocab: int = 300):
    """A byte-level BPE trained on the demo corpus' first documents, as torchtune's
    HuggingFaceBaseTokenizer; with ``template`` its post-processor adds BOS and EOS itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    from tests.data.reference import DEMO_CORPUS, read_documents

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(read_documents(DEMO_CORPUS)[:300], trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return HuggingFaceBaseTokenizer(str(folder / "tokenizer.json"),
                                    tokenizer_config_json_path=str(folder / "tokenizer_config.json"))
