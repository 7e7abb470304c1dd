"""Alpaca-format data for supervised fine-tuning: loading, prompt templates, tokenisation, batching."""

from grootl.data.alpaca import DataError, DataReport, check_records, load_records, tokenize_records
from grootl.data.batching import IGNORE_INDEX, EpochSampler, SFTCollator, make_dataloader
from grootl.data.templates import TEMPLATES, PromptTemplate, get_template

__all__ = [
    "DataError", "DataReport", "EpochSampler", "IGNORE_INDEX", "PromptTemplate", "SFTCollator", "TEMPLATES",
    "check_records", "get_template", "load_records", "make_dataloader", "tokenize_records",
]
