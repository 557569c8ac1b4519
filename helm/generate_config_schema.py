"""Write the ``config`` part of the chart's values.schema.json from ``PipelineConfig``.

The chart renders ``.Values.config`` into the pipeline config file, so its schema is the pydantic
model's JSON schema, with ``storage.root`` removed because the chart sets it from ``storage``.

    python helm/generate_config_schema.py           # rewrite values.schema.json
    python helm/generate_config_schema.py --check   # exit 1 when the file is out of date
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from deepspec.config import PipelineConfig

SCHEMA_PATH = Path(__file__).resolve().parent / "deepspec-pipeline" / "values.schema.json"
# Pydantic model names all end in "Config"; the chart's own definitions never do.
CONFIG_DEF_SUFFIX = "Config"
CHART_SET_STORAGE_KEYS = ("root",)


def config_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the pipeline config's schema and its definitions, without the keys the chart sets."""
    schema = PipelineConfig.model_json_schema()
    definitions = schema.pop("$defs")
    storage = definitions["StorageConfig"]
    for key in CHART_SET_STORAGE_KEYS:
        storage["properties"].pop(key, None)
        if key in storage.get("required", []):
            storage["required"].remove(key)
    schema["description"] = (
        "The pipeline config file that every stage reads; storage.root is set by the chart from storage"
    )
    return schema, definitions


def updated_values_schema(current: dict[str, Any]) -> dict[str, Any]:
    """Return ``current`` with its config schema and config definitions replaced by the generated ones."""
    updated = copy.deepcopy(current)
    schema, definitions = config_schema()
    updated["properties"]["config"] = schema
    chart_definitions = {
        name: value for name, value in updated["$defs"].items() if not name.endswith(CONFIG_DEF_SUFFIX)
    }
    clashes = sorted(name for name in definitions if not name.endswith(CONFIG_DEF_SUFFIX))
    if clashes:
        raise ValueError(f"config model names {clashes} do not end in {CONFIG_DEF_SUFFIX!r}; rename them")
    updated["$defs"] = {**chart_definitions, **dict(sorted(definitions.items()))}
    return updated


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the file is up to date")
    args = parser.parse_args(argv)
    current_text = SCHEMA_PATH.read_text(encoding="utf-8")
    expected_text = render(updated_values_schema(json.loads(current_text)))
    if args.check:
        if current_text != expected_text:
            print(
                f"{SCHEMA_PATH} is out of date with PipelineConfig; run python helm/generate_config_schema.py",
                file=sys.stderr,
            )
            return 1
        return 0
    SCHEMA_PATH.write_text(expected_text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
