"""Text side information: item and user descriptions rendered from atomic-file fields.

Texts are read from the raw ``.item`` / ``.user`` files rather than from RecBole's processed
features, because RecBole normalises floats, fills missing floats with the column mean and splits
``token_seq`` fields into ids; a prompt needs the original values. The result is a list aligned
with RecBole's internal ids (index 0 is padding and holds "").

Templates come from the dataset yaml, e.g. for ml-100k::

    item_text_template: "{movie_title} ({release_year})[. Genres: {class}]."

``{field}`` is replaced by the field's cleaned value; a ``[...]`` segment is dropped when any field
inside it is missing; a missing field outside brackets renders as ``text_missing_value``. An entity
whose rendered text is empty (no row in the atomic file, or every field missing) gets
``text_fallback`` (default ``"{kind} {id}"``, e.g. "item B0001", with the raw id token).

Values are cleaned: HTML entities decoded, whitespace collapsed, ``token_seq`` values split on the
dataset's ``seq_separator`` and re-joined with ``text_seq_join[field]`` (default a space), values
written as Python set/list text (Amazon 2014 ``categories``: ``'Beauty', 'Skin Care'``) parsed into
their elements, integral floats printed without ``.0``, and ``text_value_map`` applied
(e.g. ``{gender: {M: male, F: female}}``).
"""
import ast
import csv
import html
import math
import os
import re
from functools import lru_cache
from logging import getLogger

import pandas as pd

_FIELD = re.compile(r"\{(\w+)\}")
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
_SPACES = re.compile(r"\s+")


class TextTemplate:
    """A parsed template: literal text, ``{field}`` placeholders and optional ``[...]`` segments."""

    def __init__(self, template, name="template"):
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"{name} must be a non-empty string, got {template!r}")
        self.template = template
        self.name = name
        self.fields = sorted(set(_FIELD.findall(template)))
        if not self.fields:
            raise ValueError(f"{name} {template!r} refers to no field; write fields as {{field}}")

    def render(self, values, missing_value=""):
        """``values`` maps field -> cleaned string or None (missing)."""

        def fill(segment, optional):
            names = _FIELD.findall(segment)
            if optional and any(values.get(n) is None for n in names):
                return ""
            return _FIELD.sub(lambda m: values.get(m.group(1)) or missing_value, segment)

        text = _OPTIONAL.sub(lambda m: fill(m.group(1), True), self.template)
        text = fill(text, False)
        # A leading optional segment that was dropped leaves its separator behind (". Brand: X").
        return _SPACES.sub(" ", text).strip().lstrip(".,;:- ").strip()

    def is_empty_for(self, values):
        return all(values.get(field) is None for field in self.fields)


def read_atomic_file(path, field_separator="\t"):
    """Raw string columns of an atomic file, keyed by field name, plus ``{field: type}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"atomic file not found: {path}")
    df = pd.read_csv(
        path, sep=field_separator, dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
        encoding="utf-8", engine="python" if len(field_separator) > 1 else "c",
    )
    types = {}
    for column in df.columns:
        name, _, ftype = column.partition(":")
        types[name] = ftype or "token"
    df.columns = list(types)
    return df, types


@lru_cache(maxsize=4096)
def _parse_quoted_list(value):
    """Elements of Python list/set text such as ``'Beauty', 'Skin Care'``, or None if it is not."""
    try:
        parsed = ast.literal_eval(f"[{value}]")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if parsed and all(isinstance(v, str) for v in parsed):
        return parsed
    return None


def clean_value(raw, ftype, seq_separator=" ", join=" ", value_map=None):
    """Display string for one raw cell, or None if the cell is missing."""
    if raw is None:
        return None
    value = _SPACES.sub(" ", html.unescape(str(raw))).strip()
    if not value or value.lower() in {"nan", "none", "[pad]"}:
        return None
    quoted = _parse_quoted_list(value) if value[0] in "'\"" and value[-1] in "'\"" else None
    if quoted is not None:
        value = join.join(dict.fromkeys(p.strip() for p in quoted if p.strip()))
    elif ftype.endswith("_seq"):
        parts = [p for p in value.split(seq_separator) if p.strip()]
        if ftype == "float_seq":
            parts = [_format_float(p) for p in parts]
        value = join.join(parts)
    elif ftype == "float":
        value = _format_float(value)
    if value_map and value in value_map:
        value = str(value_map[value])
    return value or None


def _format_float(raw):
    try:
        number = float(raw)
    except ValueError:
        return raw
    if math.isnan(number):
        return ""
    if number.is_integer():
        return str(int(number))
    return f"{number:.10g}"


class TextSideInformation:
    """Item and user texts of a RecBole dataset, aligned with its internal ids.

    ``texts("item", "item_text_template")`` -> ``["", text of internal item 1, ...]``.
    """

    def __init__(self, config, dataset):
        self.config = config
        self.dataset = dataset
        self._tables = {}

    def _table(self, kind):
        if kind not in self._tables:
            path = os.path.join(self.config["data_path"], f'{self.config["dataset"]}.{kind}')
            self._tables[kind] = read_atomic_file(path, self.config["field_separator"] or "\t")
        return self._tables[kind]

    def template(self, key):
        if self.config[key] is None:
            raise KeyError(
                f"'{key}' is not set for dataset [{self.config['dataset']}]; add it to "
                f"properties/dataset/{self.config['dataset']}.yaml or pass --{key}=..."
            )
        return TextTemplate(self.config[key], key)

    def texts(self, kind, template_key):
        """Rendered text per internal id of ``kind`` ("item" or "user")."""
        if kind not in ("item", "user"):
            raise ValueError(f"kind must be 'item' or 'user', got {kind!r}")
        template = self.template(template_key)
        id_field = self.dataset.iid_field if kind == "item" else self.dataset.uid_field
        df, types = self._table(kind)
        unknown = [f for f in template.fields if f not in types]
        if unknown:
            raise KeyError(
                f"{template_key} refers to field(s) {unknown} that {self.config['dataset']}.{kind} "
                f"does not have; its fields are {sorted(types)}"
            )
        if id_field not in types:
            raise KeyError(f"{self.config['dataset']}.{kind} has no id column [{id_field}]")

        seq_separator = self.config["seq_separator"] or " "
        joins = self.config["text_seq_join"] or {}
        value_maps = self.config["text_value_map"] or {}
        missing = self.config["text_missing_value"] or ""
        fallback = self.config["text_fallback"] or "{kind} {id}"

        token2id = self.dataset.field2token_id[id_field]
        id2token = self.dataset.field2id_token[id_field]
        texts = [None] * len(id2token)
        columns = {f: df[f].tolist() for f in template.fields}
        for row, token in enumerate(df[id_field].tolist()):
            internal = token2id.get(token)
            if internal is None or internal == 0:
                continue  # filtered out of the dataset
            values = {
                f: clean_value(columns[f][row], types[f], seq_separator, joins.get(f, " "), value_maps.get(f))
                for f in template.fields
            }
            if not template.is_empty_for(values):
                rendered = template.render(values, missing)
                texts[internal] = rendered if rendered and rendered.strip() else None
        texts[0] = ""
        fallen_back = [internal for internal in range(1, len(texts)) if not texts[internal]]
        for internal in fallen_back:
            texts[internal] = fallback.format(kind=kind, id=id2token[internal])
        self.fallback_count = len(fallen_back)
        if fallen_back:
            getLogger().warning(
                f"{len(fallen_back)} {kind}(s) of {self.config['dataset']}.{kind} have no text under {template_key} "
                f"(empty, whitespace only or absent from the file), e.g. {kind} "
                f"{[str(id2token[i]) for i in fallen_back[:5]]}; they get text_fallback {fallback!r}")
        return texts

