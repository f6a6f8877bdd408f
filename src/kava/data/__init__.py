"""kava's data layer: one schema, one loader, the embedded synthetic task."""

from kava.data.loaders import list_datasets, load_examples, load_examples_report
from kava.data.schema import DataError, Example, example_from_record, example_to_record, step_result

__all__ = [
    "DataError",
    "Example",
    "example_from_record",
    "example_to_record",
    "list_datasets",
    "load_examples",
    "load_examples_report",
    "step_result",
]
