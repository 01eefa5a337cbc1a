"""red/run_dir.py: every JSON a run or a comparison writes is strict JSON (NaN -> null, ±inf -> strings)."""
import json
import math

from red.metrics import MetricsLogger
from red.run_dir import json_ready


def test_json_ready_replaces_non_finite_numbers_at_any_depth():
    obj = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": {"e": math.nan, "f": "x"}}, "g": 3}
    out = json_ready(obj)
    assert out == {"a": None, "b": [1.5, "inf", ["-inf", 2]], "c": {"d": {"e": None, "f": "x"}}, "g": 3}
    json.dumps(out, allow_nan=False)          # raises ValueError if any NaN/inf were left
    assert math.isnan(obj["a"])               # the input is not modified


def test_metrics_rows_are_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(str(path)) as logger:
        logger.log({"step": 1, "len_correct_mean": math.nan, "ratio_max": math.inf, "acc": 0.5})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 1, "len_correct_mean": None, "ratio_max": "inf", "acc": 0.5}
