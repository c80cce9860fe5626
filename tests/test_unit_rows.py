"""Unit rows between the Ray Data operators are Arrow-typed and readable in flight (no pickles), and the
payload codec gives back every value a pool row can hold (Parquet bytes, timestamps, decimals, lone
surrogates) unchanged."""

from __future__ import annotations

import datetime
import decimal
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray.ingest.plan import Unit, plan_file
from deita_ray.ingest.read import ReadUnitStage
from deita_ray.runtime.units import decode_payload, encode_payload
from deita_ray.scoring.config import ScoreConfig


def test_payload_codec_round_trips_every_value_type() -> None:
    value = [
        {
            "bytes": b"\x00\xff",
            "ts": datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
            "naive": datetime.datetime(2024, 1, 2),
            "date": datetime.date(2020, 1, 1),
            "time": datetime.time(1, 2, 3),
            "delta": datetime.timedelta(days=2, seconds=3, microseconds=4),
            "dec": decimal.Decimal("1.2300"),
            "text": "lone \ud800 surrogate, é, 中",
            "none": None,
            "float": 1.5,
            "int": 2**62,
            "nested": [1, {"x": "y"}],
            "nan": float("nan"),
        }
    ]
    text = encode_payload(value)
    assert text.isascii()  # escapes make any string valid UTF-8 for an Arrow string column
    back = decode_payload(text)
    assert math.isnan(back[0].pop("nan")) and back == [{k: v for k, v in value[0].items() if k != "nan"}]


def test_a_unit_row_in_flight_is_typed_text(tmp_path: Path) -> None:
    table = pa.table(
        {
            "instruction": ["q1", "q2"],
            "output": ["a1", "a2"],
            "when": [datetime.datetime(2024, 5, 1), None],
            "blob": [b"\x01", b"\x02"],
        }
    )
    pq.write_table(table, tmp_path / "pool.parquet")
    plan = plan_file(0, str(tmp_path / "pool.parquet"), str(tmp_path / "staged"), 10, "auto", "id")
    unit = Unit.from_dict(plan["units"][0])
    config = ScoreConfig(
        input=[str(tmp_path)], output=str(tmp_path / "out"), complexity_model="m", quality_model="m"
    )
    row = ReadUnitStage(config)({"unit": json.dumps(unit.to_dict())})
    schema = pa.Table.from_pylist([row]).schema
    assert {field.name: field.type for field in schema} == {
        "unit": pa.string(),
        "samples": pa.string(),
        "rejects": pa.string(),
        "counts": pa.string(),
    }
    samples = decode_payload(row["samples"])
    assert [s["original"]["when"] for s in samples] == [datetime.datetime(2024, 5, 1), None]
    assert [s["original"]["blob"] for s in samples] == [b"\x01", b"\x02"]
    assert json.loads(row["counts"]) == {"unit_id": unit.unit_id, "input_rows": 2, "blank": 0}
