#!/usr/bin/env python3
"""Merge the distinct-count sketches of Sluice aggregate records with
Apache DataSketches.

Reads JSON lines (aggregate records of rules with `sketches = true`, as an
upstream subscriber receives them) from the files named, or standard input,
and prints one JSON line per label: the distinct values across every record
(every window, series and gateway), with bounds at two standard errors.

Needs the DataSketches Python package: pip install datasketches
"""

import base64
import json
import sys

from datasketches import hll_sketch, hll_union


def main(paths):
    unions = {}
    for path in paths or ["-"]:
        stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            distinct = record.get("distinct") or {}
            if "sketch" not in distinct:
                continue
            sketch = hll_sketch.deserialize(base64.b64decode(distinct["sketch"]))
            label = distinct["label"]
            if label not in unions:
                unions[label] = hll_union(sketch.lg_config_k)
            unions[label].update(sketch)
    for label, union in sorted(unions.items()):
        print(json.dumps({
            "label": label,
            "estimate": union.get_estimate(),
            "low": union.get_lower_bound(2),
            "high": union.get_upper_bound(2),
        }))


if __name__ == "__main__":
    main(sys.argv[1:])
