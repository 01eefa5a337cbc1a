"""Training / evaluation data: JSONL or Parquet rows -> problems with gold answers and teacher traces.

Column layouts (data.columns):
* plain  - problem|question, answer|final_answer|ground_truth (gsm8k '#### x' and boxed solutions handled),
           optional trace column (solution / trace / teacher / target)
* openr1 - OpenR1-Math: problem, answer, teacher trace from `generations` (the math-verify-correct ones when
           `correctness_math_verify` is present), else `solution`
* luffy  - verl / LUFFY parquet: prompt (chat messages), reward_model.ground_truth, target (messages or text),
           data_source
* auto   - per file, from the first row's columns.
Explicit data.problem_key / answer_key / trace_key override the preset. A row without a problem or a gold
answer is a bad row: an error naming the file and row number (data.bad_rows=error) or skipped and reported
(skip). Over-long prompts / traces are rejected or truncated per config, counted and reported, never silent.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from .records import PromptItem

log = logging.getLogger("red.data")


COLUMN_LAYOUTS = ("auto", "plain", "openr1", "luffy")
"""The values of data.columns (see the module docstring)."""


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


@dataclass
class Example:
    problem: str
    answer: str
    traces: list = field(default_factory=list)
    source: str = ""
    row: int = -1
    messages: list | None = None  # chat messages of the prompt when the file gives them (luffy layout)
    fields: dict = field(default_factory=dict)  # the row's columns but the teacher traces (for reward.fn)


# ------------------------------------------------------------------------------------------ reading files


def _split_suffix(spec: str) -> tuple[str, str | None]:
    """'x@test' -> ('x', 'test'); no '@' -> (x, None)."""
    base, at, split = spec.rpartition("@")
    return (base, split or None) if at and base else (spec, None)


def _dataset_rows(ds):
    return enumerate((dict(r) for r in ds), 1)


def _hf_rows(spec: str):
    """Rows of `hf:NAME[:CONFIG][@SPLIT]` (split default train) via datasets.load_dataset: a Hub name (cached
    or downloaded; HF_DATASETS_OFFLINE=1 keeps it to the cache) or a local dataset folder."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data spec {spec!r}: needs the `datasets` package (pip install datasets)") from None
    rest, split = _split_suffix(spec[len("hf:") :])
    name, _, config = rest.partition(":") if not os.path.exists(rest) else (rest, "", "")
    if not name:
        raise DataError(
            f"data spec {spec!r}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:openai/gsm8k:main@test"
        )
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # unknown name/config/split, offline without a cache, ...
        err = e.__cause__ or e  # datasets wraps a builder's error ("An error occurred while generating ...")
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"data spec {spec!r}: datasets.load_dataset failed: {msg}") from None
    return _dataset_rows(ds)


def is_saved_dataset(path: str) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f))
        for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def _saved_rows(path: str, split: str | None):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(
                f"{path}: no split {split!r} in the saved dataset (splits: {', '.join(ds)}); use {path}@SPLIT"
            )
        ds = ds[split]
    elif split:
        raise DataError(f"{path}: a single saved split; drop '@{split}'")
    return _dataset_rows(ds)


def read_rows(path: str):
    """Yield (row_number, dict) from a .jsonl/.json/.parquet file, a save_to_disk folder (FOLDER[@SPLIT]) or a
    Hugging Face dataset (hf:NAME[:CONFIG][@SPLIT]); row numbers are 1-based data rows. Every unreadable input
    (missing, a plain directory, not UTF-8, not JSON, a row that is not an object, a broken parquet) is a
    DataError naming the file, the row where known, and the fix."""
    if path.startswith("hf:"):
        yield from _hf_rows(path)
        return
    folder, split = _split_suffix(path)
    if is_saved_dataset(path) or is_saved_dataset(folder):
        yield from _saved_rows(path, None) if is_saved_dataset(path) else _saved_rows(folder, split)
        return
    if os.path.isdir(path):
        raise DataError(
            f"data {path} is a directory: give a .jsonl, .json or .parquet file, a folder written by datasets' "
            "save_to_disk, hf:NAME[:CONFIG][@SPLIT] (or synthetic:<task>)"
        )
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's ArrowInvalid / OSError for a file that is not parquet
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"{path}: not a readable parquet file ({first}); rewrite it or use .jsonl"
            ) from None
        yield from enumerate(table.to_pylist(), 1)
        return
    with open(path, "rb") as fh:
        if path.endswith(".json"):
            raw = fh.read()
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8"
                ) from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); fix the file") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json data file must hold a list of rows")
            yield from enumerate(data, 1)
            return
        for i, raw_line in enumerate(fh, 1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path} row {i}: not UTF-8 text (byte {e.start} of the line); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} row {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f'{path} row {i}: expected a JSON object ({{"problem": ..., "answer": ...}}), '
                    f"got {type(row).__name__}"
                )
            yield i, row


def _no_binary(v, col, where: str) -> None:
    """Text columns must hold text: bytes (e.g. a parquet binary column) are a DataError naming the column, never
    trained on as the text "b'...'"."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        raise DataError(
            f"{where}, column {col!r}: expected text, got binary data ({len(bytes(v))} bytes); store the column "
            f"as strings (decode it as UTF-8 when writing the file)"
        )
    if isinstance(v, (list, tuple)):
        for x in v:
            _no_binary(x, col, where)
    elif isinstance(v, dict):
        for x in v.values():
            _no_binary(x, col, where)


PROBLEM_COLUMNS = ("problem", "question", "Problem", "query", "prompt")
ANSWER_COLUMNS = ("answer", "final_answer", "ground_truth", "gold", "expected_answer")
TRACE_COLUMNS = ("trace", "teacher", "target", "solution")
_BULKY_COLUMNS = ("generations", "target")  # long teacher traces, not kept in Example.fields


def detect_layout(row: dict) -> str:
    """luffy (chat `prompt` + `reward_model`), openr1 (`problem` + `generations`), else plain (which also reads a
    flat prompt/answer/target row)."""
    if "prompt" in row and "reward_model" in row:
        return "luffy"
    if "generations" in row and "problem" in row:
        return "openr1"
    return "plain"


def describe_layout(row: dict, layout: str, keys: dict) -> str:
    """Which column feeds the problem, the gold answer and the teacher traces (for the one detection log line)."""
    if layout == "luffy":
        cols = (
            keys.get("problem") or "prompt",
            keys.get("answer") or "reward_model.ground_truth",
            keys.get("trace") or "target",
        )
    else:
        first = {
            k: keys.get(k) or next((c for c in names if c in row), None)
            for k, names in (
                ("problem", PROBLEM_COLUMNS),
                ("answer", ANSWER_COLUMNS),
                ("trace", TRACE_COLUMNS),
            )
        }
        trace = first["trace"]
        if layout == "openr1" and not keys.get("trace"):
            trace = "generations" + (" (math-verify-correct)" if "correctness_math_verify" in row else "")
        cols = (first["problem"], first["answer"], trace)
    name = "flat prompt/answer/target" if layout == "plain" and cols[0] == "prompt" else layout
    return (
        f"layout {name}: problem <- {cols[0]}, answer <- {cols[1]}, teacher traces <- {cols[2] or '(none)'}"
    )


def _missing(where: str, what: str, key: str, given: str | None, names, row: dict) -> DataError:
    """The error for a row without a problem / gold answer: which column was read and which key maps it."""
    cols = ", ".join(map(str, row)) or "none"
    if given:
        return DataError(
            f"{where}: no {what}: column {given!r} (data.{key}) is missing or empty (row columns: {cols})"
        )
    return DataError(
        f"{where}: no {what}: none of the columns {'/'.join(names)} holds it (row columns: {cols}); "
        f"name yours with data.{key}=COLUMN"
    )


def _text(v):
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return _text(v[0] if v else None)
    if isinstance(v, dict):
        return _text(v.get("content"))
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def _texts(v) -> list[str]:
    """The non-empty texts of a value or of each item of a list."""
    return [t for t in ([_text(x) for x in v] if isinstance(v, list) else [_text(v)]) if t]


def _pick(row: dict, key: str | None, names: tuple, where: str = ""):
    """row[key] when a key is given, else the value of the first of `names` in the row (None if none is); text
    only (DataError naming the column for binary data)."""
    col = key or next((k for k in names if k in row), None)
    v = row.get(col)
    _no_binary(v, col, where)
    return v


def _gold_from_solution(sol: str | None) -> str | None:
    if not sol:
        return None
    if "####" in sol:
        return sol.rsplit("####", 1)[1].strip().replace(",", "") or None
    from .rewards import extract_boxed

    return extract_boxed(sol)


def row_to_example(row: dict, layout: str, row_no: int, path: str, keys: dict) -> Example:
    """One row -> Example; raises DataError naming the row when the problem or the gold answer is missing."""
    where = f"{path} row {row_no}"
    messages = None
    if layout == "luffy":
        prompt = _pick(row, keys.get("problem"), ("prompt",), where)
        if isinstance(prompt, str):
            try:
                prompt = json.loads(prompt)
            except json.JSONDecodeError:
                prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise DataError(f"{where}: 'prompt' must be a non-empty list of chat messages")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in prompt]
        users = [m["content"] for m in messages if m.get("role") == "user"]
        problem = users[-1] if users else None
        rm = _pick(row, None, ("reward_model",), where)
        answer = _text(
            _pick(row, keys["answer"], (), where)
            if keys.get("answer")
            else rm.get("ground_truth")
            if isinstance(rm, dict)
            else None
        )
        traces = _texts(_pick(row, keys.get("trace"), ("target",), where))
        source = str(_pick(row, None, ("data_source",), where) or os.path.basename(path))
    else:
        problem = _text(_pick(row, keys.get("problem"), PROBLEM_COLUMNS, where))
        answer = _text(_pick(row, keys.get("answer"), ANSWER_COLUMNS, where))
        if layout == "openr1" and not keys.get("trace"):
            gens = _pick(row, None, ("generations",), where) or []
            ok = row.get("correctness_math_verify")
            if isinstance(ok, list) and len(ok) == len(gens):
                gens = [g for g, c in zip(gens, ok) if c]
            traces = [g for g in (_text(x) for x in gens) if g]
            solution = _text(_pick(row, None, ("solution",), where))
            if not traces and solution:
                traces = [solution]
        else:
            traces = _texts(_pick(row, keys.get("trace"), TRACE_COLUMNS, where))
        # gsm8k: the 'answer' is a worked solution ending in '#### n'
        if answer and "####" in answer:
            traces = traces or [
                answer.rsplit("####", 1)[0].strip()
                + f"\nThe answer is \\boxed{{{_gold_from_solution(answer)}}}."
            ]
            answer = _gold_from_solution(answer)
        if answer is None:
            answer = _gold_from_solution(_text(_pick(row, None, ("solution",), where)))
        if answer and answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
            answer = answer.strip("$").strip() or None
        source = str(_pick(row, None, ("data_source",), where) or os.path.splitext(os.path.basename(path))[0])
    luffy = layout == "luffy"
    if not problem:
        names = ("prompt",) if luffy else PROBLEM_COLUMNS
        raise _missing(where, "problem text", "problem_key", keys.get("problem"), names, row)
    if not answer:
        names = ("reward_model.ground_truth",) if luffy else ANSWER_COLUMNS
        raise _missing(where, "gold answer", "answer_key", keys.get("answer"), names, row)
    fields = {k: v for k, v in row.items() if k not in _BULKY_COLUMNS}
    return Example(
        problem=problem,
        answer=answer,
        traces=traces,
        source=source,
        row=row_no,
        messages=messages,
        fields=fields,
    )


def load_examples(
    path: str,
    columns: str = "auto",
    keys: dict | None = None,
    bad_rows: str = "error",
    limit: int | None = None,
) -> tuple[list[Example], list[str]]:
    """Read a data file. Returns (examples, skipped-row reports). bad_rows='error' raises on the first bad row."""
    keys = {k: v for k, v in (keys or {}).items() if v}
    out, skipped, layout = [], [], None if columns == "auto" else columns
    described = False
    for row_no, row in read_rows(path):
        if not described:  # the first row decides (data.columns=auto) and is described in one line
            layout = layout or detect_layout(row)
            log.info("%s: %s", path, describe_layout(row, layout, keys))
            described = True
        try:
            out.append(row_to_example(row, layout, row_no, path, keys))
        except DataError as e:
            if bad_rows == "error":
                raise
            skipped.append(str(e))
        if limit is not None and len(out) >= limit:
            break
    if skipped:
        log.warning(
            "%s: skipped %d bad rows: %s%s",
            path,
            len(skipped),
            "; ".join(skipped[:5]),
            " ..." if len(skipped) > 5 else "",
        )
    if not out:
        raise DataError(f"{path}: no usable rows")
    return out, skipped


def eval_sources(cfg) -> tuple[list[str], str]:
    """(data specs, split) that a run evaluates: data.eval on the held-out split, or with eval.split=validation
    data.validation (default: data.eval's synthetic tasks) on the validation split — problems disjoint from
    both training and held-out."""
    if cfg.eval.split == "validation":
        return list(cfg.data.validation if cfg.data.validation is not None else cfg.data.eval), "validation"
    return list(cfg.data.eval), "heldout"


def load_source(spec: str, cfg, split: str = "train", seed: int = 0, limit: int | None = None):
    """A data spec (file path or synthetic:<task>) -> (examples, skipped reports)."""
    if spec.startswith("synthetic:"):
        from . import synthetic

        task = spec.split(":", 1)[1]
        n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_eval_size
        if limit is not None:
            n = min(n, limit)
        try:
            rows = synthetic.generate(task, n, seed=seed if split == "train" else 0, split=split)
        except ValueError as e:
            raise DataError(f"data spec {spec!r}: {e}") from None
        return [
            Example(
                problem=r["problem"], answer=r["answer"], traces=r["traces"], source=r["source"], row=i + 1
            )
            for i, r in enumerate(rows)
        ], []
    keys = {"problem": cfg.problem_key, "answer": cfg.answer_key, "trace": cfg.trace_key}
    return load_examples(spec, cfg.columns, keys, cfg.bad_rows, limit)


# ------------------------------------------------------------------------------------------ tokenising


def render_prompt(tokenizer, ex: Example, system_prompt: str | None, template: str) -> str:
    """Chat-template text of the prompt (generation prompt appended)."""
    if ex.messages is not None and template == "{problem}":
        messages = [dict(m) for m in ex.messages]
        if system_prompt is not None:
            messages = [m for m in messages if m.get("role") != "system"]
            messages.insert(0, {"role": "system", "content": system_prompt})
    else:
        messages = [{"role": "user", "content": template.replace("{problem}", ex.problem)}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


@dataclass
class TokenizeReport:
    prompts_rejected: list = field(default_factory=list)
    prompts_truncated: list = field(default_factory=list)
    traces_rejected: list = field(default_factory=list)
    traces_truncated: list = field(default_factory=list)
    think_stripped: int = 0

    def counts(self) -> dict:
        return {k: len(v) for k, v in vars(self).items() if isinstance(v, list)}


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    dcfg,
    max_response_len: int,
    eos_id: int,
    need_traces: bool = False,
    name: str = "data",
    with_traces: bool = True,
) -> tuple[list[PromptItem], TokenizeReport]:
    """Chat-template and tokenise prompts and teacher traces (each trace + EOS, as an assistant response).

    Over-long prompts (> data.max_prompt_len) and traces (> max_response_len incl. EOS) are rejected or
    truncated per data.overlong_prompt / data.overlong_trace; every case is recorded by row in the report.
    need_traces: a problem without any usable trace is rejected (recorded as a rejected trace).
    with_traces=False: prompts only (evaluation).
    """
    rep = TokenizeReport()
    items = []
    for uid, ex in enumerate(examples):
        text = render_prompt(tokenizer, ex, dcfg.system_prompt, dcfg.prompt_template)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > dcfg.max_prompt_len:
            if dcfg.overlong_prompt == "reject":
                rep.prompts_rejected.append(ex.row)
                continue
            rep.prompts_truncated.append(ex.row)
            ids = ids[-dcfg.max_prompt_len :]
        traces = []
        for tr in ex.traces if with_traces else []:
            if text.rstrip().endswith("<think>") and tr.lstrip().startswith("<think>"):
                tr = tr.lstrip()[len("<think>") :].lstrip("\n")
                rep.think_stripped += 1
            t_ids = tokenizer(tr, add_special_tokens=False)["input_ids"] + [eos_id]
            if len(t_ids) > max_response_len:
                if dcfg.overlong_trace == "reject":
                    rep.traces_rejected.append(ex.row)
                    continue
                rep.traces_truncated.append(ex.row)
                t_ids = t_ids[:max_response_len]
            traces.append(t_ids)
        if need_traces and not traces:
            if not ex.traces:
                rep.traces_rejected.append(ex.row)
            continue
        items.append(
            PromptItem(
                prompt_ids=ids,
                answer=ex.answer,
                trace_ids=traces,
                source=ex.source,
                row=ex.row,
                uid=uid,
                problem=ex.problem,
                fields=ex.fields,
            )
        )
    for what, rows in (
        ("prompts rejected (too long)", rep.prompts_rejected),
        ("prompts truncated", rep.prompts_truncated),
        ("teacher traces rejected (too long or missing)", rep.traces_rejected),
        ("teacher traces truncated (no EOS, answer may be lost)", rep.traces_truncated),
    ):
        if rows:
            log.warning(
                "%s: %d %s, rows %s%s", name, len(rows), what, rows[:10], " ..." if len(rows) > 10 else ""
            )
    if not items:
        raise DataError(f"{name}: no usable problems after tokenisation ({rep.counts()})")
    return items, rep


# ------------------------------------------------------------------------------------------ order / cursor


class PromptStream:
    """Deterministic, resumable prompt order: epoch-wise seeded permutations; `cursor` = prompts consumed."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, cursor: int = 0):
        self.size, self.seed, self.shuffle, self.cursor = size, seed, shuffle, cursor
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch):
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.size, generator=g).tolist()
            else:
                self._perm = list(range(self.size))
            self._perm_epoch = epoch
        return self._perm

    def take(self, n: int) -> list[int]:
        start, self.cursor = self.cursor, self.cursor + n
        return [self._order(c // self.size)[c % self.size] for c in range(start, start + n)]

    @property
    def epoch(self) -> float:
        return self.cursor / self.size
