"""Prompt sources for data-free text-to-image methods: prompt files (.txt, .jsonl, .parquet;
local and on a moto S3 server), their errors, and PromptStream (rank split, small sets,
exact resume); the prompt-file mode of jobs/make_shards.py."""
from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyperscale.data.fashion_mnist import CLASS_NAMES, PROMPT_TEMPLATES
from hyperscale.data.fmnist_captions import all_prompts
from hyperscale.data.prompts import (PromptStream, load_prompts, prompt_stream, write_prompts)
from hyperscale.storage import s3
from hyperscale.storage.local import REPO
from s3_server import BUCKET  # its fixtures (moto) come through conftest.py

PROMPTS = ["a red fox in the snow", "  a lighthouse at dusk ", "une tour Eiffel en hiver",
           "a bowl of ramen, studio light", "ein Hund 🐕 am Strand"]
CLEAN = [p.strip() for p in PROMPTS]


# ------------------------------------------------------------------------------ files

@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_written_prompt_files_round_trip(tmp_path, fmt):
    path = write_prompts(PROMPTS, tmp_path / f"p.{fmt}")
    assert load_prompts(path) == CLEAN
    assert load_prompts(str(path)) == load_prompts(f"file://{path}") == CLEAN
    assert [p.name for p in tmp_path.iterdir()] == [f"p.{fmt}"]  # no temp file left


def test_hand_written_files_follow_the_format_rules(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n  first prompt  \n\n\t\nsecond prompt\r\nthird\n", encoding="utf-8")
    assert load_prompts(txt) == ["first prompt", "second prompt", "third"]

    jsonl = tmp_path / "a.jsonl"
    lines = [{"prompt": "from prompt", "text": "not this"}, {"text": "from text", "caption": "no"},
             {"caption": "from caption", "url": "http://x"}, {"caption": "   "}]
    jsonl.write_text("\n".join(map(json.dumps, lines)) + "\n\n", encoding="utf-8")
    assert load_prompts(jsonl) == ["from prompt", "from text", "from caption"]  # blank dropped

    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"url": ["u1", "u2", "u3"], "caption": ["c1", None, " c3 "],
                             "text": ["t1", "t2", "t3"]}), parquet)
    assert load_prompts(parquet) == ["t1", "t2", "t3"]  # text comes before caption
    pq.write_table(pa.table({"caption": ["c1", None, " c3 "]}), parquet)
    assert load_prompts(parquet) == ["c1", "c3"]  # nulls are no prompt


def test_prompt_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"p\.csv.*accepted suffixes: \.txt, \.jsonl, \.parquet"):
        load_prompts(tmp_path / "p.csv")
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero\.jsonl: no prompts"):
        load_prompts(tmp_path / "zero.jsonl")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"url": "http://x", "alt": "no prompt here"}\n')
    with pytest.raises(ValueError) as err:
        load_prompts(bad)
    assert str(bad) in str(err.value) and "line 3" in str(err.value)
    assert "prompt, text, caption" in str(err.value)
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"line 2: field 'prompt' is int, not a string"):
        load_prompts(bad)
    bad.write_text('{"prompt": "ok"}\n{"prompt": "cut\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_prompts(bad)
    bad.write_text('["a list, not an object"]\n')
    with pytest.raises(ValueError, match="line 1: no prompt field"):
        load_prompts(bad)

    pq.write_table(pa.table({"url": ["u"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols\.parquet: no prompt column.*prompt, text, caption"):
        load_prompts(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="not strings"):
        load_prompts(tmp_path / "ints.parquet")

    with pytest.raises(ValueError, match="no prompts given"):
        write_prompts([], tmp_path / "w.txt")
    with pytest.raises(ValueError, match="on one line"):
        write_prompts(["two\nlines"], tmp_path / "w.txt")
    assert not (tmp_path / "w.txt").exists()


def test_prompt_files_on_s3(moto, tmp_path):
    for fmt in ("txt", "jsonl", "parquet"):
        path = write_prompts(PROMPTS, tmp_path / f"p.{fmt}")
        s3.upload_file(path, f"s3://{BUCKET}/prompts/p.{fmt}")
        assert load_prompts(f"s3://{BUCKET}/prompts/p.{fmt}") == CLEAN
    with pytest.raises(FileNotFoundError, match=rf"s3://{BUCKET}/prompts/missing.txt"):
        load_prompts(f"s3://{BUCKET}/prompts/missing.txt")
    s3.put_text(f"s3://{BUCKET}/prompts/blank.txt", "\n\n")
    with pytest.raises(ValueError, match=rf"s3://{BUCKET}/prompts/blank.txt: no prompts"):
        load_prompts(f"s3://{BUCKET}/prompts/blank.txt")
    stream = prompt_stream(f"s3://{BUCKET}/prompts/p.jsonl", batch_size=2, seed=1)
    assert set(next(stream)[1]) <= set(CLEAN)


# ----------------------------------------------------------------------------- stream

def _prompts(n: int) -> list[str]:
    return [f"prompt {i}" for i in range(n)]


def test_ranks_take_disjoint_slices_of_each_epoch():
    prompts, batch, world = _prompts(50), 4, 3
    per_rank = 50 // world  # 16: 4 whole batches; 2 prompts per epoch left out
    epochs = []
    for epoch in range(2):
        slices = []
        for rank in range(world):
            stream = PromptStream(prompts, batch, rank, world, seed=7)
            got = [next(stream) for _ in range(4 * (epoch + 1))][4 * epoch:]
            assert all(x is None and len(y) == batch for x, y in got)
            slices.append([p for _, y in got for p in y])
        flat = [p for s in slices for p in s]
        assert len(flat) == len(set(flat)) == world * per_rank  # disjoint across ranks
        epochs.append(slices)
    assert epochs[0] != epochs[1]  # a new permutation every epoch
    # the permutation depends on the seed only (not on rank): same seed, same epoch order
    again = PromptStream(prompts, batch, 1, world, seed=7)
    assert [p for _ in range(4) for p in next(again)[1]] == epochs[0][1]
    other = PromptStream(prompts, batch, 1, world, seed=8)
    assert [p for _ in range(4) for p in next(other)[1]] != epochs[0][1]


def test_fewer_prompts_than_a_global_batch_are_tiled():
    prompts = _prompts(3)
    streams = [PromptStream(prompts, batch_size=4, rank=r, world_size=2, seed=0) for r in range(2)]
    for _ in range(3):  # each epoch: the permutation tiled 3 times, 4 positions per rank
        batches = [next(s)[1] for s in streams]
        assert all(len(b) == 4 and set(b) <= set(prompts) for b in batches)
        counts = np.unique(batches[0] + batches[1], return_counts=True)[1]
        assert sorted(counts) == [2, 3, 3]  # near-equal use of every prompt
    one = PromptStream(["only"], batch_size=5)
    assert next(one) == (None, ["only"] * 5)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptStream([], batch_size=2)
    with pytest.raises(ValueError, match="rank < world_size"):
        PromptStream(prompts, batch_size=2, rank=2, world_size=2)


@pytest.mark.parametrize("n,batch,world", [(37, 5, 1), (37, 5, 2), (6, 4, 3)])
def test_stream_resumes_exactly(n, batch, world):
    prompts = _prompts(n)
    for rank in range(world):
        for k in (0, 1, 3, 7, 8, 15):  # across epoch ends
            original = PromptStream(prompts, batch, rank, world, seed=11)
            for _ in range(k):
                next(original)
            state = copy.deepcopy(original.state_dict())
            expected = [next(original) for _ in range(20)]
            restored = PromptStream(list(prompts), batch, rank, world, seed=11)
            restored.load_state_dict(state)
            assert [next(restored) for _ in range(20)] == expected


def test_restore_refuses_another_source_and_restarts_on_another_layout(caplog):
    stream = PromptStream(_prompts(20), 4, seed=1)
    with pytest.raises(ValueError, match="not a prompt-stream cursor"):
        stream.load_state_dict({"epoch": 0, "position": 0})
    for _ in range(3):
        next(stream)
    changed = PromptStream(_prompts(21), 4, seed=1)
    changed.load_state_dict(stream.state_dict())
    assert "exact resume is not possible" in caplog.text
    assert (changed.epoch, changed.position) == (1, 0)


# -------------------------------------------------------------------------- entry script

def _make_shards_main():
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "jobs" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_make_shards_writes_class_prompts(tmp_path, capsys, fmt):
    main = _make_shards_main()
    main(["--kind", "prompts", "--out", str(tmp_path), "--format", fmt, "--all-templates"])
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / f"prompts.{fmt}")
    prompts = load_prompts(path)
    assert len(prompts) == len(PROMPT_TEMPLATES) * len(CLASS_NAMES)
    assert prompts[:2] == ["a photo of a t-shirt/top", "a photo of a trouser"]
    assert "a ankle boot on a plain background" in prompts and "a picture of a bag" in prompts
    main(["--kind", "prompts", "--out", str(tmp_path), "--format", fmt,
          "--template", "a sketch of a {c}"])
    assert load_prompts(path) == [f"a sketch of a {c}" for c in CLASS_NAMES]
    main(["--kind", "prompts", "--out", str(tmp_path), "--format", fmt, "--captions", "varied"])
    assert load_prompts(path) == all_prompts()
