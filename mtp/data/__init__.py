"""Data: text-file corpus (TFDS/ArrayRecord) -> SentencePiece tokenizer -> Grain packed batches."""

from mtp.config import check_data_config
from mtp.data.corpus import build_corpus, list_files, split_of
from mtp.data.pipeline import make_dataset
from mtp.data.prepare import (
    PreparedData,
    TokenizedDocuments,
    prepare_data,
    tokenized_documents,
)
from mtp.data.tokenizer import Tokenizer

__all__ = [
    "PreparedData",
    "TokenizedDocuments",
    "Tokenizer",
    "build_corpus",
    "check_data_config",
    "list_files",
    "make_dataset",
    "prepare_data",
    "split_of",
    "tokenized_documents",
]
