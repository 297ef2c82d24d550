"""The base encoder's tokenizer for scoring, read from its `tokenizer.json` with the `tokenizers` library alone.

transformers' `AutoTokenizer` wraps the same Rust tokenizer, but importing its tokenization code costs a scorer
~40 MB of resident memory for nothing it uses. Training keeps transformers' tokenizer (`learner.encoder`);
`tests/test_model.py` checks that both give the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from learner.errors import ModelLoadError


class ScoringTokenizer:
    """Ids of texts, truncated to `max_length` tokens with the special ones included, never padded."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        path = model_dir / "tokenizer.json"
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises its own exception type for a missing or broken file
            raise ModelLoadError(f"cannot load the tokenizer {path}: {e}") from e
        # The file ships with padding to 128 and truncation at 128; scoring pads per batch itself.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self.pad_token_id: int = self._id("[PAD]", None) or 0
        self.unk_token_id = self._id("[UNK]", None)
        special = (t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special)
        self.all_special_ids = sorted(i for i in map(self._tokenizer.token_to_id, special) if i is not None)

    def _id(self, token: str, default: int | None) -> int | None:
        found = self._tokenizer.token_to_id(token)
        return default if found is None else int(found)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Return each text's ids, [CLS] … [SEP], in order."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]
