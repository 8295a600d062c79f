"""The `alignx` TFDS dataset builder: local AlignX parquet/JSON(L) rows -> array_record files.

Runs without TensorFlow (not installed here; tests/test_sources.py asserts that): TFDS 4.9's
`GeneratorBasedBuilder` with `file_format='array_record'` serializes examples with its own
protobuf/numpy code path, and `as_data_source()` / `tfds.data_source` / `tfds.builder_from_directory`
read them back through `array_record` random access. Some TFDS details matter here:
  * `_info()` builds a `tfds.core.DatasetInfo` directly: `dataset_info_from_configs` wants a package
    folder with metadata files next to the builder's module, which a library module does not have; its
    `initialize_from_bucket` does nothing (TFDS's left an empty folder in /tmp at every construction);
  * `code_path` is overridden: TFDS 4.9.10 derives it through `importlib_resources.abc`, a
    backport it only installs on Python < 3.9, so on 3.11 any builder living in a package fails
    with ModuleNotFoundError. The module's own file is the right answer anyway;
  * `DatasetInfo(disable_shuffling=True)`: TFDS otherwise reorders examples by a hash of their key; keeping the
    source order makes record i the i-th valid source row (the loader shuffles per epoch anyway).

Each row is one JSON string feature (`row`) plus its 0-based position among the split's valid rows
(`index`): nested history lists survive as they are, and unknown extra fields are kept.
The source (a file, a folder, or a folder with `train/`, `test/`, `validation/` sub-folders, one
split each) is given at construction (`source=`), or as the TFDS manual dir.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from alignx_jax import paths
from alignx_jax.data import schema
from alignx_jax.errors import DataError


def split_sources(source: str) -> dict[str, tuple[str, list[str]]]:
    """split name -> (path, its data files): the folder's train/validation/test sub-folders if it has any,
    else train. `source` is listed once; a missing or empty folder fails here, before anything is written."""
    splits = schema.split_listing(source)
    for path, files in splits.values():  # as list_files(path) would refuse them
        if not files:
            raise DataError(schema.NO_DATA_FILES, file=path)
        if not paths.is_url(path):
            schema.refuse_tfds_folder(path)
    return splits or {"train": (source, schema.list_files(source))}


def _json_default(x: Any) -> Any:
    """Parquet values JSON lacks, in a text form (an extra field is kept, not interpreted)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (datetime.date, datetime.time)):  # datetime.datetime too
        return x.isoformat()
    if isinstance(x, (decimal.Decimal, datetime.timedelta)):
        return str(x)
    if isinstance(x, (bytes, bytearray)):
        return base64.b64encode(bytes(x)).decode("ascii")
    raise TypeError(f"cannot serialize {type(x).__name__}")


def encode_row(row: dict, file: str | None = None, index: int | None = None) -> str:
    try:
        text = json.dumps(row, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError) as e:  # a value of a type JSON has no form for
        raise DataError(f"cannot store the row as JSON: {e}", file=file, row=index) from None
    try:
        text.encode("utf-8")  # TFDS's Text feature stores UTF-8: its own error is a traceback
    except UnicodeEncodeError:
        key, bad = _lone_surrogate(row)
        raise DataError(
            f"cannot store the row: not valid Unicode text: {bad}",
            file=file,
            row=index,
            field=key,  # named by its repr, which escapes a surrogate
        ) from None
    return text


def _lone_surrogate(row: dict) -> tuple[str, str]:
    """(the field, the character escaped) of the first lone surrogate ("\\ud83d", half an emoji) in a row's
    field names or values: schema refuses them in the fields it reads, an extra field keeps its own."""
    for key, value in row.items():
        for text in (key, json.dumps(value, ensure_ascii=False, default=_json_default)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return key, text[e.start : e.end].encode("unicode_escape").decode("ascii")
    raise AssertionError("the row's JSON holds no lone surrogate")


def decode_row(value: Any) -> dict:
    return json.loads(value.decode("utf-8") if isinstance(value, bytes) else value)


class _LocalInfo(tfds.core.DatasetInfo):
    # TFDS's version makes an empty /tmp/tmp*tfds folder it never removes, then looks in its public
    # bucket for a precomputed info, where this dataset never is
    def initialize_from_bucket(self) -> None:
        pass


class AlignX(tfds.core.GeneratorBasedBuilder):
    """AlignX-schema preference rows from local files (one JSON string per row)."""

    name = "alignx"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One JSON-encoded AlignX row per example, plus its source index."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass source=PATH (an AlignX parquet/JSON(L) file or folder)."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # see the module docstring
        return epath.Path(__file__)

    def __init__(
        self, *, source: str | None = None, kind: str = "auto", skip_bad: bool = False, **kwargs: Any
    ):
        self._source = source
        self._kind = kind
        self._skip_bad = skip_bad
        self.counts: dict[str, dict[str, int]] = {}  # split -> {"rows", "skipped"}, filled while preparing
        super().__init__(**kwargs)

    # TFDS prints "Downloading and preparing ..." before the rows are read and "Subsequent calls will reuse
    # this data" after, neither true here (nothing downloads; a rerun is refused): `alignx` says what it wrote
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalInfo(
            builder=self,
            description="AlignX personalized preference rows (prompt, chosen, rejected, persona fields), "
            "each stored as one JSON string.",
            features=tfds.features.FeaturesDict({"row": tfds.features.Text(), "index": np.int64}),
            supervised_keys=None,
            disable_shuffling=True,  # keep source order (the class attribute alone is not read here)
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        source = self._source or (str(dl_manager.manual_dir) if dl_manager.manual_dir else None)
        if not source:
            raise DataError("the alignx builder needs a source file or folder")
        splits = split_sources(source)
        return {split: self._generate_examples(split, path, files) for split, (path, files) in splits.items()}

    def _generate_examples(self, split: str, path: str, files: list[str]):  # type: ignore[override]
        """The split's rows, validated as they stream one file at a time (memory: one file, not the data
        set); a bad row is a DataError that ends the preparation, whose temporary folder `prepare` removes."""
        counts = self.counts.setdefault(split, {})
        rows = schema.iter_rows(path, kind=self._kind, skip_bad=self._skip_bad, counts=counts, files=files)
        for i, (row, file, index) in enumerate(rows):
            yield i, {"row": encode_row(row, file, index), "index": i}
        if not counts["rows"]:
            raise DataError("no valid rows to prepare", file=path)
