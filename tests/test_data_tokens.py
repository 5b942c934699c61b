"""data.bpe / data.shards / data.batching on a small demo corpus: tokenizer round trip, shard contents,
manifest integrity, and the two batching modes (random windows, stateful tracks with resume)."""
import json
import os

import numpy as np
import pytest
import torch

import data
from data.sources import iter_documents

VOCAB = 512


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_tokens")
    raw = root / "raw"
    data.write_raw_corpus("demo", raw, demo_seed=0, demo_size_mb=0.4)
    stats = data.train_bpe([raw / "train.txt"], root / "tok" / "tokenizer.json", vocab_size=VOCAB)
    manifest = data.write_token_shards(root / "tok" / "tokenizer.json", raw, root / "shards")
    return {"root": root, "raw": raw, "tok": root / "tok" / "tokenizer.json", "shards": root / "shards",
            "bpe": stats, "manifest": manifest}


WIKI_TEXT = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : "
             "戦場のヴァルキュリア3 ) is a tactical role @-@ playing game , released in 2011 for 1 @,@ 200 ¥ . \n"
             " \n = = Gameplay = = \n \n  Tabs\tand   spaces , émigré naïve café 🙂 \r\n")


def test_tokenizer_round_trip_and_eot(built):
    tok = data.load_tokenizer(built["tok"])
    assert built["bpe"]["vocab_size"] == tok.get_vocab_size() == VOCAB
    eot = tok.token_to_id(data.EOT_TOKEN)
    assert built["bpe"]["eot_id"] == eot == 0
    assert tok.decode(tok.encode(WIKI_TEXT).ids) == WIKI_TEXT  # byte-level: lossless, unseen characters too
    assert tok.encode(data.EOT_TOKEN).ids == [eot]  # one special token
    assert tok.decode(tok.encode("a" + data.EOT_TOKEN + "b").ids, skip_special_tokens=False) == "a" + data.EOT_TOKEN + "b"


def test_tokenizer_is_atomic_and_sampled(tmp_path, built):
    out = tmp_path / "t" / "tokenizer.json"
    s = data.train_bpe([built["raw"] / "train.txt"], out, vocab_size=300, max_train_bytes=20_000)
    assert 19_000 <= s["train_bytes"] <= 20_000 and s["corpus_bytes"] > 300_000
    assert out.is_file() and not list(out.parent.glob("*.tmp*"))
    json.loads(out.read_text())
    # the sample is spread over the whole text, in whole lines
    from data.bpe import iter_text_chunks
    path = built["raw"] / "train.txt"
    chunks = list(iter_text_chunks([path], 1 << 16, 20_000))
    text = path.read_text(encoding="utf-8")
    assert all(c.endswith("\n") and c in text for c in chunks)
    assert text.index(chunks[-1]) > len(text) * 0.9 and len(chunks) > 30


def test_vocab_bounds_are_refused_up_front(tmp_path, built):
    with pytest.raises(ValueError, match=r"vocab_size=70000 is too large.*uint16.*at most 65535"):
        data.train_bpe([built["raw"] / "train.txt"], tmp_path / "t.json", vocab_size=70000)
    with pytest.raises(ValueError, match=r"vocab_size=65536 is too large"):
        data.train_bpe([built["raw"] / "train.txt"], tmp_path / "t.json", vocab_size=65536)
    with pytest.raises(ValueError, match=r"too small"):
        data.train_bpe([built["raw"] / "train.txt"], tmp_path / "t.json", vocab_size=100)
    assert not (tmp_path / "t.json").exists()


def test_shards_equal_direct_encoding_with_eot_between_documents(built):
    tok = data.load_tokenizer(built["tok"])
    eot = tok.token_to_id(data.EOT_TOKEN)
    shards = data.TokenShards(built["shards"])
    for split in data.SPLITS:
        docs = list(iter_documents(built["raw"] / f"{split}.txt"))
        expect, starts = [], []
        for d in docs:
            starts.append(len(expect))
            expect += tok.encode(d).ids + [eot]
        got = shards.split(split)
        assert got.dtype == np.uint16 and isinstance(got, np.memmap)
        np.testing.assert_array_equal(np.asarray(got), np.array(expect, dtype=np.uint16))
        np.testing.assert_array_equal(shards.doc_starts(split), np.array(starts, dtype=np.int64))
        info = built["manifest"]["splits"][split]
        assert info["tokens"] == len(expect) and info["documents"] == len(docs)
        assert info["bytes"] == (built["raw"] / f"{split}.txt").stat().st_size
        # decoding one document's tokens gives the article back
        s0, s1 = shards.doc_starts(split)[:2]
        assert tok.decode(np.asarray(got[s0:s1 - 1]).tolist()) == docs[0]


def test_manifest_records_sizes_and_hashes(built):
    m = json.loads((built["shards"] / "shards.json").read_text())
    assert m == built["manifest"]
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["vocab_size"] == VOCAB and m["eot_id"] == 0
    for name, info in m["files"].items():
        p = built["shards"] / name
        assert p.stat().st_size == info["bytes"]
        assert data.shards.sha256_file(p) == info["sha256"]
    assert set(m["files"]) == {f"{s}.bin" for s in data.SPLITS} | {f"{s}.docs.npy" for s in data.SPLITS}
    assert not [p for p in built["shards"].iterdir() if ".tmp" in p.name]


def test_text_that_spells_eot_is_not_a_separator(tmp_path, built):
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in data.SPLITS:
        (raw / f"{s}.txt").write_text(f" = A = \n \n the token {data.EOT_TOKEN} in text . \n = B = \n \n b . \n")
    m = data.write_token_shards(built["tok"], raw, tmp_path / "sh", num_workers=1)
    toks = np.asarray(data.TokenShards(tmp_path / "sh").split("train"))
    assert m["splits"]["train"]["documents"] == 2 and int((toks == m["eot_id"]).sum()) == 2


@pytest.fixture
def shard_copy(tmp_path, built):
    import shutil

    dst = tmp_path / "shards"
    shutil.copytree(built["shards"], dst)
    return dst


def test_token_shards_refuses_tampered_shard(shard_copy):
    with open(shard_copy / "validation.bin", "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=r"validation.bin does not match the sha256.*rebuild"):
        data.TokenShards(shard_copy)


def test_token_shards_refuses_truncated_shard(shard_copy):
    with open(shard_copy / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"train.bin has 1000 bytes, the manifest says .*truncated"):
        data.TokenShards(shard_copy, verify=False)


def test_token_shards_refuses_unfinished_directory(shard_copy):
    (shard_copy / "shards.json").unlink()
    with pytest.raises(ValueError, match=r"no shards.json.*not finished"):
        data.TokenShards(shard_copy)


def test_write_token_shards_refuses_missing_or_empty_split(tmp_path, built):
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(ValueError, match=r"train.txt does not exist.*write_raw_corpus"):
        data.write_token_shards(built["tok"], raw, tmp_path / "sh")
    for s in data.SPLITS:
        (raw / f"{s}.txt").write_text(" = A = \n \n text . \n")
    (raw / "test.txt").write_text(" \n \n")
    with pytest.raises(ValueError, match=r"split 'test' .* has no documents"):
        data.write_token_shards(built["tok"], raw, tmp_path / "sh")
    assert not (tmp_path / "sh" / "shards.json").exists()


def test_random_windows_are_real_slices(built):
    toks = data.TokenShards(built["shards"]).split("train")
    g = torch.Generator().manual_seed(0)
    x, y = data.random_windows(toks, 8, 32, g)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    arr = np.asarray(toks, dtype=np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        hits = [i for i in range(len(arr) - 32) if arr[i] == row_x[0] and np.array_equal(arr[i:i + 32], row_x)]
        assert any(np.array_equal(arr[i + 1:i + 33], row_y) for i in hits)
    x2, _ = data.random_windows(toks, 8, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match=r"too few for windows of seq_len=100"):
        data.random_windows(toks[:50], 2, 100)


def test_stateful_tracks_cover_the_stream_in_order(built):
    shards = data.TokenShards(built["shards"])
    toks, starts = shards.split("validation"), shards.doc_starts("validation")
    B, T = 4, 16
    tr = data.StatefulTracks(toks, starts, B, T, loop=False)
    L = (len(toks) - 1) // B
    assert len(tr) == L // T
    batches = list(tr)
    assert len(batches) == len(tr)
    xs = torch.stack([b[0] for b in batches], 1)  # (B, S, T)
    ys = torch.stack([b[1] for b in batches], 1)
    arr = torch.from_numpy(np.asarray(toks, dtype=np.int64))
    start_set = set(starts.tolist())
    for b in range(B):
        span = xs[b].reshape(-1)  # row b over all steps = one contiguous stretch of the stream
        assert torch.equal(span, arr[b * L: b * L + len(span)])
        assert torch.equal(ys[b].reshape(-1), arr[b * L + 1: b * L + 1 + len(span)])
        for s, (_, _, new) in enumerate(batches):
            pos = b * L + s * T
            assert bool(new[b]) == (s == 0 or pos in start_set), (b, s)
    flags = torch.stack([b[2] for b in batches])
    assert flags[0].all() and flags[1:].sum() > 0  # validation documents do start mid-track


def test_stateful_tracks_resume_and_wrap(built):
    shards = data.TokenShards(built["shards"])
    toks, starts = shards.split("validation"), shards.doc_starts("validation")
    a = data.StatefulTracks(toks, starts, 3, 8)
    first = [next(a) for _ in range(5)]
    state = a.state_dict()
    rest = [next(a) for _ in range(len(a) + 3)]  # crosses the epoch boundary
    b = data.StatefulTracks(toks, starts, 3, 8)
    b.load_state_dict(state)
    again = [next(b) for _ in range(len(a) + 3)]
    for (x1, y1, n1), (x2, y2, n2) in zip(rest, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(n1, n2)
    wrapped = rest[len(a) - 5]
    assert torch.equal(wrapped[0], first[0][0]) and wrapped[2].all() and b.epoch == 1
    with pytest.raises(ValueError, match=r"cannot resume StatefulTracks.*same split, batch_size and seq_len"):
        data.StatefulTracks(toks, starts, 4, 8).load_state_dict(state)


def test_stateful_tracks_refuse_a_short_split(built):
    toks = data.TokenShards(built["shards"]).split("test")
    with pytest.raises(ValueError, match=r"too few for 64 tracks.*need batch_size \* seq_len \+ 1 = 65537"):
        data.StatefulTracks(toks[:5000], np.array([0]), 64, 1024)
