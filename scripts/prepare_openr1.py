"""Turn the paper's training set into the file the paper's config reads (`data.train` of
red/configs/qwen2.5-math-1.5b-openr1.yaml, default data/openr1_math_46k.parquet):

    python scripts/prepare_openr1.py --src hf:Elliott/Openr1-Math-46k-8192 [--out data/openr1_math_46k.parquet]
    python scripts/prepare_openr1.py --src path/to/train.parquet            # or .jsonl, a save_to_disk folder

The source may be in LUFFY's layout (OpenR1-Math-46k as the paper trained on it: chat `prompt`,
`reward_model.ground_truth`, `target` = the R1 trace) or in OpenR1-Math's own (problem, answer, generations,
correctness_math_verify); red.data reads either and this writes one flat row per problem:
problem, answer, target (the first usable teacher trace), data_source. Rows without a problem, a gold answer or
a trace are skipped and counted. Nothing is downloaded unless --src names a Hub dataset that is not cached.
"""

from __future__ import annotations

import argparse
import os
import sys

from red.data import DataError, load_examples

DEFAULT_OUT = "data/openr1_math_46k.parquet"


def prepare(src: str, out: str, limit: int | None = None) -> dict:
    """Read `src` (any layout red.data detects), write the flat parquet `out`; returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    examples, skipped = load_examples(src, bad_rows="skip", limit=limit)
    rows = [
        {"problem": e.problem, "answer": e.answer, "target": e.traces[0], "data_source": e.source}
        for e in examples
        if e.traces
    ]
    if not rows:
        raise DataError(f"{src}: no row with a problem, a gold answer and a teacher trace")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out)
    return {"written": len(rows), "skipped_bad": len(skipped), "skipped_no_trace": len(examples) - len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--src", required=True, help="hf:NAME[:CONFIG][@SPLIT], a data file or a save_to_disk folder"
    )
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"parquet to write (default {DEFAULT_OUT})")
    ap.add_argument("--limit", type=int, default=None, help="first N usable rows only")
    args = ap.parse_args(argv)
    try:
        counts = prepare(args.src, args.out, args.limit)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {counts['written']} problems with a teacher trace ({counts['skipped_bad']} bad rows, "
        f"{counts['skipped_no_trace']} without a trace skipped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
