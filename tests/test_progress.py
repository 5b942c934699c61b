"""The progress helper: line contents (done/total, rate, ETA), throttling and the closing line."""

import pytest

from gt_pipeline.engine.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_carry_done_total_rate_and_eta():
    clock, lines = FakeClock(), []
    p = Progress("niah", 40, lines.append, unit="trials", every_s=5, clock=clock)
    for _ in range(10):  # 10 trials in 5 s: 2 trials/s, 30 left -> 15 s
        clock.t += 0.5
        p.advance()
    assert lines == ["niah: 10/40 trials (25%) | 2 trials/s | ETA 15s"]


def test_bytes_are_shown_in_mb_and_eta_in_minutes():
    clock, lines = FakeClock(), []
    p = Progress("tokenize", 600e6, lines.append, unit="B", every_s=1, clock=clock)
    clock.t += 10
    p(5e6)  # 0.5 MB/s, 595 MB left -> 1190 s = 19m50s
    assert lines == ["tokenize: 5.0/600.0 MB (1%) | 0.5 MB/s | ETA 19m50s"]


def test_throttling_one_line_per_interval_and_one_closing_line():
    clock, lines = FakeClock(), []
    p = Progress("eval", 100, lines.append, unit="steps", every_s=5, clock=clock)
    for _ in range(100):  # 100 updates over 25 s: lines at 5, 10, 15, 20 s, then the completion line at 25 s
        clock.t += 0.25
        p.advance()
    p.finish()  # completion already written: nothing more
    assert len(lines) == 5, lines
    assert lines[:4] == [f"eval: {n}/100 steps ({n}%) | 4 steps/s | ETA {s}s" for n, s in ((20, 20), (40, 15), (60, 10),
                                                                                          (80, 5))]
    assert lines[-1] == "eval: 100/100 steps (100%) | 4 steps/s | in 25s"


def test_finish_short_of_total_reports_what_was_done():
    clock, lines = FakeClock(), []
    p = Progress("ablation", 10, lines.append, unit="evals", every_s=60, clock=clock)
    clock.t += 3
    p(6)
    p.finish()
    assert lines == ["ablation: 6/10 evals (60%) | 2 evals/s | in 3s"]


def test_a_new_total_replaces_the_old_one():
    clock, lines = FakeClock(), []
    p = Progress("shards", 1, lines.append, every_s=0, clock=clock)
    clock.t += 1
    p(1, total=4)
    assert lines == ["shards: 1/4 (25%) | 1/s | ETA 3s"]


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (65, "1m05s"), (3600 * 2 + 180, "2h03m"),
                                           (float("inf"), "?"), (float("nan"), "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"Progress\('x'\)\.total must be > 0"):
        Progress("x", 0, print)
    with pytest.raises(ValueError, match=r"every_s must be >= 0"):
        Progress("x", 1, print, every_s=-1)


def test_tokenization_reports_bytes_up_to_the_corpus_size(tmp_path):
    """data's callbacks: BPE reading and sharding count raw bytes, monotonically, up to the whole text."""
    import data

    data.write_raw_corpus("demo", tmp_path / "raw", demo_size_mb=0.2)
    seen_bpe, seen_shards = [], []
    data.train_bpe([tmp_path / "raw" / "train.txt"], tmp_path / "tok.json", vocab_size=300,
                   progress=lambda d, t: seen_bpe.append((d, t)), chunk_bytes=1 << 12)
    data.write_token_shards(tmp_path / "tok.json", tmp_path / "raw", tmp_path / "shards", batch_docs=10,
                            progress=lambda d, t: seen_shards.append((d, t)))
    train_size = (tmp_path / "raw" / "train.txt").stat().st_size
    corpus = sum((tmp_path / "raw" / f"{s}.txt").stat().st_size for s in ("train", "validation", "test"))
    for seen, total in ((seen_bpe, train_size), (seen_shards, corpus)):
        assert len(seen) > 3
        assert {t for _, t in seen} == {total}
        done = [d for d, _ in seen]
        assert done == sorted(done) and done[-1] == total
