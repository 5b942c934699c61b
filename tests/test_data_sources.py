"""data.sources / data.demo: the three WikiText sources, document splitting, demo determinism, errors.

No network: the HF test runs offline against an empty cache and expects the "use local files" error.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
from data import demo
from data.sources import RAW_FILES, iter_documents, write_raw_corpus

REPO = Path(__file__).resolve().parents[1]

# Two articles in the exact wiki.*.raw layout, with non-ASCII text and WikiText escapes.
ARTICLE_A = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 ) "
             ", is a tactical role @-@ playing video game . \n The game began development in 2010 . \n \n"
             " = = Gameplay = = \n \n It sold 1 @,@ 200 copies at 3 @.@ 5 dollars – a record . \n \n")
ARTICLE_B = " = Tower Building of the Little Rock Arsenal = \n \n The building was built in 1840 . \n \n"


def split_texts() -> dict[str, str]:
    arts = demo.iter_articles(7, "validation")
    extra = [next(arts) for _ in range(6)]
    return {
        "train": " \n" + ARTICLE_A + ARTICLE_B + "".join(extra[:4]),
        "validation": " \n" + ARTICLE_B + extra[4],
        "test": " \n" + ARTICLE_A + extra[5],
    }


def make_raw_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, text in split_texts().items():
        (d / RAW_FILES[split]).write_text(text, encoding="utf-8")
    return d


def make_parquet_dir(d: Path, parts: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    for split, text in split_texts().items():
        rows = ["" if line == " \n" else line for line in text.splitlines(keepends=True)]  # HF stores blanks as ""
        n = len(rows) // parts + 1
        for i in range(parts):
            pq.write_table(pa.table({"text": rows[i * n:(i + 1) * n]}), d / f"{split}-{i:05d}-of-{parts:05d}.parquet")
    return d


def test_local_raw_files_copied_byte_for_byte(tmp_path):
    src = make_raw_dir(tmp_path / "wikitext")
    stats = write_raw_corpus("local", tmp_path / "out", local_dir=src)
    texts = split_texts()
    for split in data.SPLITS:
        got = (tmp_path / "out" / f"{split}.txt").read_text(encoding="utf-8")
        assert got == texts[split]
        assert stats[split]["bytes"] == len(texts[split].encode("utf-8"))
        assert stats[split]["lines"] == texts[split].count("\n")
        assert stats[split]["documents"] == len(list(iter_documents(tmp_path / "out" / f"{split}.txt")))
    assert stats["train"]["documents"] == 6


def test_local_parquet_equals_raw_layout(tmp_path):
    write_raw_corpus("local", tmp_path / "from_raw", local_dir=make_raw_dir(tmp_path / "raw"))
    # HF's repo layout: the parquet files sit in a wikitext-103-raw-v1/ subfolder
    pq_root = tmp_path / "hf"
    make_parquet_dir(pq_root / "wikitext-103-raw-v1")
    stats = write_raw_corpus("local", tmp_path / "from_pq", local_dir=pq_root)
    for split in data.SPLITS:
        assert (tmp_path / "from_pq" / f"{split}.txt").read_bytes() == (tmp_path / "from_raw" / f"{split}.txt").read_bytes()
    assert stats["validation"]["documents"] == 2


def test_iter_documents_splits_at_top_level_titles(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text(" \n" + ARTICLE_A + ARTICLE_B, encoding="utf-8")
    docs = list(iter_documents(p))
    # the leading blank line is not a document; section headings do not split
    assert docs == [ARTICLE_A, ARTICLE_B]


def test_demo_corpus_is_deterministic_and_wikitext_shaped(tmp_path):
    s1 = write_raw_corpus("demo", tmp_path / "a", demo_seed=0, demo_size_mb=1.0)
    s2 = write_raw_corpus("demo", tmp_path / "b", demo_seed=0, demo_size_mb=1.0)
    s3 = write_raw_corpus("demo", tmp_path / "c", demo_seed=1, demo_size_mb=0.2)
    assert s1 == s2
    for split in data.SPLITS:
        h1 = hashlib.sha256((tmp_path / "a" / f"{split}.txt").read_bytes()).hexdigest()
        h2 = hashlib.sha256((tmp_path / "b" / f"{split}.txt").read_bytes()).hexdigest()
        assert h1 == h2, split
    assert (tmp_path / "a" / "train.txt").read_bytes()[:2000] != (tmp_path / "c" / "train.txt").read_bytes()[:2000]
    assert 1_000_000 <= s1["train"]["bytes"] < 1_100_000
    text = (tmp_path / "a" / "train.txt").read_text(encoding="utf-8")
    docs = list(iter_documents(tmp_path / "a" / "train.txt"))
    assert len(docs) == s1["train"]["documents"] > 100
    assert all(d.startswith(" = ") and not d.startswith(" = = ") for d in docs)
    assert " = = History = = \n" in text and " @,@ " in text
    assert all(line.endswith(" \n") for line in text.splitlines(keepends=True))  # wiki.*.raw line endings


def test_demo_facts_are_stated_in_the_corpus(tmp_path):
    facts = data.demo.facts()
    assert facts == data.demo.facts(0) and facts != data.demo.facts(1)
    assert len(facts) >= 100
    f = facts[0]
    assert isinstance(f, data.Fact) and f.prompt.startswith("The capital of ") and f.subject in f.prompt
    for f in facts:
        assert len(f.distractors) == 3 and f.answer not in f.distractors and len(set(f.distractors)) == 3
    write_raw_corpus("demo", tmp_path, demo_size_mb=3.0)
    train = (tmp_path / "train.txt").read_text(encoding="utf-8")
    stated = [f for f in facts if f.sentence in train]
    assert len(stated) >= 0.9 * len(facts)
    # no contradictions: a subject's prompt is never completed with a distractor
    assert not any(f"{f.prompt} {d} ." in train for f in facts for d in f.distractors)


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data source 'wikipedia'.*hf.*local.*demo"):
        write_raw_corpus("wikipedia", tmp_path)


def test_missing_local_dir(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*GT_WIKITEXT_DIR"):
        write_raw_corpus("local", tmp_path / "out", local_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"needs local_dir.*GT_WIKITEXT_DIR"):
        write_raw_corpus("local", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds neither wiki.train.raw.*train-\*.parquet"):
        write_raw_corpus("local", tmp_path / "out", local_dir=tmp_path / "empty")


def test_missing_split_file(tmp_path):
    src = make_raw_dir(tmp_path / "w")
    (src / "wiki.valid.raw").unlink()
    with pytest.raises(ValueError, match=r"lacks .*wiki.valid.raw"):
        write_raw_corpus("local", tmp_path / "out", local_dir=src)
    pq_dir = make_parquet_dir(tmp_path / "p")
    for f in pq_dir.glob("test-*.parquet"):
        f.unlink()
    with pytest.raises(ValueError, match=r"none matching test-\*.parquet"):
        write_raw_corpus("local", tmp_path / "out", local_dir=pq_dir)


def test_empty_split(tmp_path):
    src = make_raw_dir(tmp_path / "w")
    (src / "wiki.test.raw").write_text(" \n \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"split 'test' .*wiki.test.raw.* is empty"):
        write_raw_corpus("local", tmp_path / "out", local_dir=src)
    assert not list((tmp_path / "out").glob("test.txt*"))  # nothing half-written left behind


def test_unreadable_parquet(tmp_path):
    d = make_parquet_dir(tmp_path / "p")
    bad = sorted(d.glob("validation-*.parquet"))[0]
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match=rf"cannot read parquet file .*{bad.name}.*download it again"):
        write_raw_corpus("local", tmp_path / "out", local_dir=d)


def test_hf_rows_are_written_like_the_raw_files(tmp_path, monkeypatch):
    """The hf source with datasets.load_dataset replaced by an in-memory DatasetDict of HF-shaped rows."""
    datasets = pytest.importorskip("datasets")
    texts = split_texts()
    dd = datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"text": ["" if x == " \n" else x for x in t.splitlines(keepends=True)]})
        for s, t in texts.items()})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or dd)
    stats = write_raw_corpus("hf", tmp_path / "out", hf_cache_dir=tmp_path / "cache")
    assert calls[0][0] == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert calls[0][1]["cache_dir"] == str(tmp_path / "cache")
    for s in data.SPLITS:
        assert (tmp_path / "out" / f"{s}.txt").read_text(encoding="utf-8") == texts[s]
    assert stats["train"]["documents"] == 6


def test_hf_offline_gives_the_use_local_files_error(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(REPO)}
    code = ("import data, sys\n"
            "try:\n"
            f"    data.write_raw_corpus('hf', {str(tmp_path / 'out')!r}, hf_cache_dir={str(tmp_path / 'cache')!r})\n"
            "except RuntimeError as e:\n"
            "    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    msg = r.stdout
    assert "Salesforce/wikitext" in msg and "GT_DATA_SOURCE=local" in msg and "GT_WIKITEXT_DIR" in msg
    assert "wiki.train.raw" in msg and "train-*.parquet" in msg
