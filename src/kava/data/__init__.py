"""Data layer: one example schema, the dataset loaders, the embedded synthetic task, local
data files, and the token sequences and batches built from examples (``kava.data.sequences``,
which needs torch and is therefore not imported here). Imports only kava's core modules
(``kava.config``, ``kava.answers``)."""

from kava.data.files import validate_file, write_jsonl
from kava.data.loaders import load_data, load_examples, load_examples_report
from kava.data.registry import list_datasets
from kava.data.schema import DataError, Example, example_from_record, example_to_record, step_result

__all__ = [
    "DataError",
    "Example",
    "example_from_record",
    "example_to_record",
    "list_datasets",
    "load_data",
    "load_examples",
    "load_examples_report",
    "step_result",
    "validate_file",
    "write_jsonl",
]
