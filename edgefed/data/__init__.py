"""Task-generic data for EdgeFed (device side: numpy + stdlib; pyarrow/matplotlib lazily).

Records (records.py), readers for the formats users bring (readers.py), deterministic
splits (splits.py), label mapping (labels.py) and the built-in Rotten Tomatoes task.
"""
from __future__ import annotations

from .errors import DataError
from .fields import Fields
from .labels import label_set, label_targets
from .readers import read_jsonl, read_records, write_jsonl
from .records import TASK_KINDS, Example, PreferencePair, Record, SFTExample
from .report import write_split_report
from .rotten_tomatoes import SENTIMENT_PROMPT_INIT, SENTIMENT_TEMPLATE, load_rotten_tomatoes, rotten_tomatoes_pairs
from .splits import SPLIT_KINDS, dirichlet_split, group_split, iid_split, split_examples, train_heldout_split

__all__ = [
    "SENTIMENT_TEMPLATE", "SENTIMENT_PROMPT_INIT", "Example", "SFTExample", "PreferencePair", "Record", "TASK_KINDS",
    "load_rotten_tomatoes", "rotten_tomatoes_pairs", "train_heldout_split", "iid_split",
    "dirichlet_split", "group_split", "split_examples", "SPLIT_KINDS", "write_jsonl", "read_jsonl",
    "read_records", "Fields", "DataError", "label_targets", "label_set", "write_split_report",
]
